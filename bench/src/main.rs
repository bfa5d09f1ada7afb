//! idemq benchmark (see README).
fn main() {}
