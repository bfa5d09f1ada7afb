//! idemq operator.
fn main() {}
