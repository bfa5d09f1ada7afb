//! Readiness: the sidecar is ready only while every component it depends on
//! (the key store, and in pipeline mode the broker) is up.
//!
//! Components register by name and flip their own flag; `/readyz` reports each
//! one, so an operator reading the probe output sees which part is down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Flags = Vec<(&'static str, Arc<AtomicBool>)>;

#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<Flags>>,
}

/// One component's flag; starts down.
#[derive(Clone)]
pub struct Component(Arc<AtomicBool>);

impl Component {
    pub fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component, down until it says otherwise.
    pub fn register(&self, name: &'static str) -> Component {
        let flag = Arc::new(AtomicBool::new(false));
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, flag.clone()));
        Component(flag)
    }

    /// Each component with whether it is up.
    pub fn report(&self) -> Vec<(&'static str, bool)> {
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, flag)| (*name, flag.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.report().iter().all(|(_, up)| *up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is_up() {
        let health = Health::new();
        let store = health.register("store");
        let broker = health.register("broker");
        assert!(!health.is_ready());
        store.set(true);
        assert!(!health.is_ready());
        broker.set(true);
        assert!(health.is_ready());
        store.set(false);
        assert_eq!(health.report(), vec![("store", false), ("broker", true)]);
    }
}
