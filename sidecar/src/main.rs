//! idemq-sidecar binary (to be written).
fn main() {}
