//! A fixed list of pods, for fleets outside Kubernetes and for local runs.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::Deserialize;

use super::{cancelled, DiscoveryError, PodEndpoint, PodRole, Publisher, Shutdown};

/// One statically configured pod.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticPod {
    /// Where the pod serves the OpenAI API, e.g. `10.0.0.5:8000`.
    pub http: SocketAddr,
    /// A name for logs; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// Connect mode: the pod's ZMQ PUB endpoint, e.g. `tcp://10.0.0.5:5557`.
    #[serde(default)]
    pub events: Option<String>,
    /// The pod's ZMQ ROUTER replay endpoint.
    #[serde(default)]
    pub replay: Option<String>,
    /// The host part of the pod's topic `kv@<host>@<model>`; defaults to the address's IP.
    #[serde(default)]
    pub topic_host: Option<String>,
    /// `prefill`, `decode` or `both` (the default): which legs of a disaggregated request it serves.
    #[serde(default)]
    pub role: PodRole,
}

impl StaticPod {
    fn endpoint(&self) -> PodEndpoint {
        let address = self.http.to_string();
        PodEndpoint {
            name: self.name.clone().unwrap_or_else(|| address.clone()),
            key: address,
            http: self.http,
            events: self.events.clone(),
            replay: self.replay.clone(),
            topic_host: self
                .topic_host
                .clone()
                .unwrap_or_else(|| self.http.ip().to_string()),
            role: self.role,
        }
    }
}

pub(super) fn validate(pods: &[StaticPod]) -> Result<(), DiscoveryError> {
    let mut seen = HashSet::new();
    for pod in pods {
        if !seen.insert(pod.http) {
            return Err(DiscoveryError::InvalidConfig(format!(
                "static pod {} is listed twice",
                pod.http
            )));
        }
    }
    Ok(())
}

/// Publishes the list once, then holds until shutdown.
pub(super) async fn run(pods: &[StaticPod], publisher: &Publisher, mut shutdown: Shutdown) {
    publisher.publish(pods.iter().map(StaticPod::endpoint).collect());
    cancelled(&mut shutdown).await;
}
