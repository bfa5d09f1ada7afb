//! In-memory key store (to be written).
