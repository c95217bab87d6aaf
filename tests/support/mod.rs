//! Harnesses shared by the integration tests.

pub mod prometheus;
