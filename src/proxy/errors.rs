//! Client-facing errors, shaped like OpenAI's (`{"error":{"message","type","param","code"}}`)
//! so SDKs surface them as the matching exception, and written with the right status.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Serialize;

use super::body::BodyError;
use super::forward::ForwardError;
use crate::tokenize::{self, RequestError, TokenizeError};

/// One error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// Machine-readable `code`, e.g. `model_not_found`.
    pub code: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub message: String,
    /// Seconds after which a retry may succeed (`Retry-After`), for refusals that pass.
    pub retry_after_secs: Option<u32>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after_secs: None,
        }
    }

    pub fn invalid_request(code: &'static str, message: String) -> Self {
        Self::new(400, "invalid_request_error", code, message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist."),
        )
    }

    pub fn path_not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown request URL: {path}."),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("Method {method} is not allowed on {path}."),
        )
    }

    pub fn no_healthy_pod(model: &str) -> Self {
        Self::new(
            503,
            "server_error",
            "no_healthy_pod",
            format!("No healthy pod is serving model `{model}` right now."),
        )
    }

    /// Flow control refused the request without queueing it (429), or it waited too long (503).
    pub fn flow_refused(
        status: u16,
        code: &'static str,
        message: String,
        retry_after_secs: u32,
    ) -> Self {
        let kind = if status == 429 {
            "rate_limit_error"
        } else {
            "server_error"
        };
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(status, kind, code, message)
        }
    }

    pub fn header_too_large(bytes: usize, limit: usize) -> Self {
        Self::new(
            431,
            "invalid_request_error",
            "request_header_too_large",
            format!("The request header is {bytes} bytes; the limit is {limit}."),
        )
    }

    pub fn too_many_header_fields(fields: usize, limit: usize) -> Self {
        Self::new(
            431,
            "invalid_request_error",
            "too_many_header_fields",
            format!("The request has {fields} header fields; the limit is {limit}."),
        )
    }

    pub fn too_many_connections() -> Self {
        Self::new(
            503,
            "server_error",
            "too_many_connections",
            "The gateway is at its connection limit; retry shortly.".into(),
        )
    }

    /// Serializes the body. Plain strings only, so this cannot fail.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        Bytes::from(
            serde_json::to_vec(&Envelope {
                error: Inner {
                    message: &self.message,
                    kind: self.kind,
                    param: self.param.as_deref(),
                    code: self.code,
                },
            })
            .unwrap_or_default(),
        )
    }
}

/// Bodies are read in well under a second on any working link, so their share of the
/// buffer turns over quickly.
const BUFFER_FULL_RETRY_AFTER_SECS: u32 = 1;

impl From<&BodyError> for ApiError {
    fn from(e: &BodyError) -> Self {
        match e {
            BodyError::TooLarge { .. } => Self::new(
                413,
                "invalid_request_error",
                "request_too_large",
                e.to_string(),
            ),
            BodyError::Read(_) => Self::invalid_request("body_read_failed", e.to_string()),
            BodyError::TimedOut { .. } => Self::new(
                408,
                "invalid_request_error",
                "request_timeout",
                e.to_string(),
            ),
            // Bodies being read or in flight free their share as their requests end.
            BodyError::BufferFull { .. } => Self {
                retry_after_secs: Some(BUFFER_FULL_RETRY_AFTER_SECS),
                ..Self::new(503, "server_error", "body_buffer_full", e.to_string())
            },
        }
    }
}

/// Request and prompt errors come with their OpenAI shape from the tokenizer.
impl From<tokenize::ApiError> for ApiError {
    fn from(e: tokenize::ApiError) -> Self {
        Self {
            status: e.status,
            kind: e.kind,
            code: e.code,
            param: e.param,
            message: e.message,
            retry_after_secs: None,
        }
    }
}

impl From<&RequestError> for ApiError {
    fn from(e: &RequestError) -> Self {
        e.api_error().into()
    }
}

impl From<&TokenizeError> for ApiError {
    fn from(e: &TokenizeError) -> Self {
        e.api_error().into()
    }
}

impl From<&ForwardError> for ApiError {
    fn from(e: &ForwardError) -> Self {
        match e {
            ForwardError::NoCandidates => Self::new(
                503,
                "server_error",
                "no_healthy_pod",
                "No healthy pod is available for this request.".into(),
            ),
            // The pods' addresses and error chain go to the log, not to the client.
            ForwardError::AllAttemptsFailed { attempts, .. } => Self::new(
                503,
                "server_error",
                "upstream_unavailable",
                format!("No pod could be reached ({attempts} attempt(s)); try again later."),
            ),
            ForwardError::ResponseTimeout { after, .. } => Self::new(
                504,
                "server_error",
                "upstream_timeout",
                format!("The model server sent no response within {after:?}."),
            ),
            ForwardError::NoResponse { .. } => Self::new(
                502,
                "server_error",
                "upstream_no_response",
                "The model server received the request and failed without answering. It was not \
                 sent to another server, since this one may have processed it."
                    .into(),
            ),
            ForwardError::BadUpstreamResponse { .. } | ForwardError::ResponseTooLarge { .. } => {
                Self::new(
                    502,
                    "server_error",
                    "bad_upstream_response",
                    "The model server sent an invalid response.".into(),
                )
            }
            ForwardError::ClientGone | ForwardError::Interrupted { .. } => Self::new(
                502,
                "server_error",
                "upstream_interrupted",
                "The response was interrupted.".into(),
            ),
        }
    }
}

/// Writes `err` as the whole response.
pub async fn respond(
    session: &mut Session,
    err: &ApiError,
    request_id: &str,
) -> pingora::Result<()> {
    let body = err.body();
    let mut header = ResponseHeader::build(err.status, Some(5))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header(super::REQUEST_ID_HEADER, request_id)?;
    if let Some(secs) = err.retry_after_secs {
        header.insert_header(http::header::RETRY_AFTER, secs)?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
