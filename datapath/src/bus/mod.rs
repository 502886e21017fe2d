//! The in-process event bus that the controllers talk through.
//!
//! Two kinds of typed topic, and no enum that every module must match:
//!
//! - [`state`]: a value with one writer and many readers (services, interfaces, the flow
//!   tables' handles, later names and processes). Readers see the latest value, can wait for
//!   it to be ready, and see a resync (not ready, then ready again) when its writer restarts.
//! - [`topic`]: events (flow opened, closed, denied, expired; later DNS answers, exec,
//!   connect) broadcast to every subscriber through a bounded buffer of its own. A subscriber
//!   that falls behind loses events; every loss is counted, per topic and subscriber.
//!
//! [`Bus`] is the registry of topics: a controller asks it for a topic by name and type, so
//! publishers and subscribers meet without knowing each other.
pub mod state;
pub mod topic;

use std::{
    any::Any,
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

pub use state::{State, StateReader, StateWriter};
pub use topic::{Subscriber, Topic, TopicStats};

use crate::{Error, Result};

/// The registry of every topic and state of the daemon, shared by its controllers.
#[derive(Default)]
pub struct Bus {
    topics: Mutex<BTreeMap<&'static str, Arc<dyn Any + Send + Sync>>>,
    states: Mutex<BTreeMap<&'static str, Arc<dyn Any + Send + Sync>>>,
    /// Loss and traffic figures of every event topic, for `/metrics`.
    stats: Mutex<Vec<Arc<dyn TopicStats>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The event topic `name` carrying `T`, created with `capacity` events of buffer per
    /// subscriber on first use. Asking for an existing name with another type is a bug in the
    /// daemon and answers an error rather than a topic that nobody publishes to.
    pub fn topic<T: Clone + Send + Sync + 'static>(
        &self,
        name: &'static str,
        capacity: usize,
    ) -> Result<Arc<Topic<T>>> {
        let mut topics = lock(&self.topics);
        if let Some(any) = topics.get(name) {
            return Arc::clone(any)
                .downcast::<Topic<T>>()
                .map_err(|_| mistyped("topic", name));
        }
        let topic = Arc::new(Topic::<T>::new(name, capacity));
        topics.insert(name, Arc::clone(&topic) as Arc<dyn Any + Send + Sync>);
        lock(&self.stats).push(Arc::clone(&topic) as Arc<dyn TopicStats>);
        Ok(topic)
    }

    /// The state `name` holding a `T`, created (not ready, holding `T::default()`) on first use.
    pub fn state<T: Default + Send + Sync + 'static>(
        &self,
        name: &'static str,
    ) -> Result<Arc<State<T>>> {
        let mut states = lock(&self.states);
        if let Some(any) = states.get(name) {
            return Arc::clone(any)
                .downcast::<State<T>>()
                .map_err(|_| mistyped("state", name));
        }
        let state = Arc::new(State::<T>::new(name));
        states.insert(name, Arc::clone(&state) as Arc<dyn Any + Send + Sync>);
        Ok(state)
    }

    /// Every event topic's figures.
    pub fn topic_stats(&self) -> Vec<Arc<dyn TopicStats>> {
        lock(&self.stats).clone()
    }
}

fn mistyped(kind: &str, name: &str) -> Error {
    Error::InvalidArgument(format!(
        "bus {kind} {name:?} was already created with another type"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_name_gives_the_same_topic_and_another_type_is_refused() {
        let bus = Bus::new();
        let a = bus.topic::<u32>("flows", 8).unwrap();
        let b = bus.topic::<u32>("flows", 8).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(bus.topic::<String>("flows", 8).is_err());
        assert_eq!(bus.topic_stats().len(), 1);
        let s = bus.state::<Vec<u8>>("ifaces").unwrap();
        assert!(Arc::ptr_eq(&s, &bus.state::<Vec<u8>>("ifaces").unwrap()));
        assert!(bus.state::<u8>("ifaces").is_err());
    }
}
