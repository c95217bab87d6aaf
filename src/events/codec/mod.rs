//! The KV-event wire codec (see `decode`).

mod decode;

pub use decode::*;
