//! Redis key store (to be written).
