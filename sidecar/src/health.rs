//! Readiness: the sidecar is ready only while every component it depends on
//! (the key store, and in pipeline mode the broker and the application) is up.
//!
//! Components register by name and set their own state; `/readyz` reports each
//! one with a word (`up`, `down`, or why it waits, such as `app: waiting`), so
//! an operator reading the probe output sees which part holds the sidecar back.

use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    up: bool,
    word: &'static str,
}

type States = Vec<(&'static str, Arc<Mutex<State>>)>;

#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<States>>,
}

/// One component's state; starts down.
#[derive(Clone)]
pub struct Component(Arc<Mutex<State>>);

impl Component {
    pub fn set(&self, up: bool) {
        self.set_state(up, if up { "up" } else { "down" });
    }

    /// Sets whether the component is up, with the word `/readyz` shows.
    pub fn set_state(&self, up: bool, word: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = State { up, word };
    }

    pub fn is_up(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).up
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component, down until it says otherwise.
    pub fn register(&self, name: &'static str) -> Component {
        let state = Arc::new(Mutex::new(State {
            up: false,
            word: "down",
        }));
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, state.clone()));
        Component(state)
    }

    /// Each component with whether it is up and the word that says its state.
    pub fn report(&self) -> Vec<(&'static str, bool, &'static str)> {
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, state)| {
                let s = *state.lock().unwrap_or_else(|e| e.into_inner());
                (*name, s.up, s.word)
            })
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.report().iter().all(|(_, up, _)| *up)
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
        let app = health.register("app");
        assert!(!health.is_ready());
        store.set(true);
        broker.set(true);
        app.set_state(false, "waiting");
        assert!(!health.is_ready());
        app.set_state(true, "up");
        assert!(health.is_ready());
        store.set(false);
        app.set_state(false, "unavailable");
        assert_eq!(
            health.report(),
            vec![
                ("store", false, "down"),
                ("broker", true, "up"),
                ("app", false, "unavailable")
            ]
        );
    }
}
