//! The proxy's side of flow control (`crate::flow`): where a request waits for dispatch,
//! and how a refusal is answered.

use pingora::proxy::Session;

use super::errors::ApiError;
use super::log::RequestCtx;
use super::KvGateProxy;
use crate::flow::{Admission, Dispatch, QueueRefusal};
use crate::metrics::flow::ShedReason;

impl KvGateProxy {
    /// Returns once `model`'s flow control lets the request be scheduled, or `None` when
    /// its client disconnected while it waited (it has left the queue then).
    pub(super) async fn wait_for_dispatch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model: &str,
        body_bytes: usize,
    ) -> Result<Option<Dispatch>, ApiError> {
        let queued = match self
            .gateway
            .flow
            .admit(model, &session.req_header().headers, body_bytes)
        {
            Admission::Pass => return Ok(Some(Dispatch::default())),
            Admission::Shed {
                reason,
                retry_after_secs,
            } => return Err(shed(model, reason, retry_after_secs)),
            Admission::Queued(queued) => queued,
        };
        tokio::select! {
            waited = queued.wait() => match waited {
                Ok(dispatch) => Ok(Some(dispatch)),
                Err(QueueRefusal { reason: ShedReason::Deadline, waited, retry_after_secs }) => {
                    Err(ApiError::flow_refused(
                        503,
                        "queue_timeout",
                        format!(
                            "Every server of model `{model}` stayed saturated for the {:.1} s \
                             this request waited in the queue; try again later.",
                            waited.as_secs_f64()
                        ),
                        retry_after_secs,
                    ))
                }
                Err(refusal) => Err(shed(model, refusal.reason, refusal.retry_after_secs)),
            },
            // The body is read whole, so anything on the connection now is its close.
            _ = session.downstream_session.read_body_or_idle(true) => {
                ctx.error = Some("client disconnected while queued".into());
                session.set_keepalive(None);
                Ok(None)
            }
        }
    }
}

fn shed(model: &str, reason: ShedReason, retry_after_secs: u32) -> ApiError {
    let message = match reason {
        ShedReason::Sheddable => format!(
            "Every server of model `{model}` is saturated and this request's priority is \
             sheddable; try again later."
        ),
        ShedReason::QueueFull => format!(
            "Every server of model `{model}` is saturated and its queue is full; try again later."
        ),
        ShedReason::QueueBytes => format!(
            "Every server of model `{model}` is saturated and its queue holds all the request \
             bytes it may; try again later."
        ),
        ShedReason::Displaced => format!(
            "Every server of model `{model}` is saturated and a more important request took \
             this one's place in the full queue; try again later."
        ),
        ShedReason::Deadline => format!("The request for model `{model}` waited too long."),
    };
    ApiError::flow_refused(429, reason.as_str(), message, retry_after_secs)
}
