//! TEMPORARY interface shim until the `k8s` branch merges (replaced whole).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodEndpoint {
    pub key: String,
    pub name: String,
    pub http: std::net::SocketAddr,
    pub events: Option<String>,
    pub replay: Option<String>,
    pub topic_host: String,
}
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiscoveryConfig {
    Static { pods: Vec<String> },
}
