//! State topics: one writer, many readers, the latest value only.
//!
//! The writer is taken by the controller that owns the state. Taking it starts a resync: the
//! state reads "not ready" (readers keep the last value) until the writer publishes a full
//! value. So when a controller restarts, its readers see the gap and then the rebuilt value,
//! as with kube-rs's reflector stores (Init, then InitDone).
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

use crate::{Error, Result};

/// What readers see.
#[derive(Debug)]
struct Snapshot<T> {
    value: Arc<T>,
    ready: bool,
    /// How many writers have owned the state: a reader that saw another number missed a
    /// restart of the writer.
    incarnation: u64,
    /// How many values have been published (`publish` and `modify`): a reader that saw another
    /// number has a new value to look at.
    version: u64,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
            ready: self.ready,
            incarnation: self.incarnation,
            version: self.version,
        }
    }
}

/// A state topic. See the module documentation.
pub struct State<T> {
    name: &'static str,
    tx: watch::Sender<Snapshot<T>>,
    writer_taken: AtomicBool,
}

impl<T: Default + Send + Sync + 'static> State<T> {
    pub(super) fn new(name: &'static str) -> Self {
        Self {
            name,
            tx: watch::Sender::new(Snapshot {
                value: Arc::new(T::default()),
                ready: false,
                incarnation: 0,
                version: 0,
            }),
            writer_taken: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The one writer. Refused while another writer lives: a state has a single writer.
    /// Taking it marks the state not ready until [`StateWriter::publish`].
    pub fn writer(self: &Arc<Self>) -> Result<StateWriter<T>> {
        if self.writer_taken.swap(true, Ordering::SeqCst) {
            return Err(Error::InvalidArgument(format!(
                "state {:?} already has a writer",
                self.name
            )));
        }
        self.tx.send_modify(|s| {
            s.ready = false;
            s.incarnation += 1;
        });
        Ok(StateWriter {
            state: Arc::clone(self),
        })
    }

    pub fn reader(&self) -> StateReader<T> {
        StateReader {
            rx: self.tx.subscribe(),
        }
    }
}

/// The writing end of a [`State`]; dropping it frees the state for the next writer (a
/// restarted controller), and leaves the last value readable.
pub struct StateWriter<T> {
    state: Arc<State<T>>,
}

impl<T> StateWriter<T> {
    /// Replaces the whole value and marks the state ready (the end of a resync).
    pub fn publish(&self, value: T) {
        self.state.tx.send_modify(|s| {
            s.value = Arc::new(value);
            s.ready = true;
            s.version += 1;
        });
    }

    /// Marks the state not ready while it is rebuilt (the start of a resync).
    pub fn resync(&self) {
        self.state.tx.send_modify(|s| s.ready = false);
    }

    /// The value as published last.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.state.tx.borrow().value)
    }
}

impl<T: Clone> StateWriter<T> {
    /// Changes the value in place (copy on write: readers holding the old value keep it).
    pub fn modify(&self, f: impl FnOnce(&mut T)) {
        self.state.tx.send_modify(|s| {
            let mut value = T::clone(&s.value);
            f(&mut value);
            s.value = Arc::new(value);
            s.version += 1;
        });
    }
}

impl<T> Drop for StateWriter<T> {
    fn drop(&mut self) {
        self.state.writer_taken.store(false, Ordering::SeqCst);
    }
}

/// A reading end of a [`State`].
pub struct StateReader<T> {
    rx: watch::Receiver<Snapshot<T>>,
}

impl<T> Clone for StateReader<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
        }
    }
}

impl<T> StateReader<T> {
    /// The latest value, ready or not.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.rx.borrow().value)
    }

    pub fn is_ready(&self) -> bool {
        self.rx.borrow().ready
    }

    /// How many writers have owned the state so far (not how many values: see `version`).
    pub fn incarnation(&self) -> u64 {
        self.rx.borrow().incarnation
    }

    /// How many values have been published so far: a reader that remembers it knows whether
    /// the value changed since.
    pub fn version(&self) -> u64 {
        self.rx.borrow().version
    }

    /// The latest value and its version, read together.
    pub fn get_versioned(&self) -> (Arc<T>, u64) {
        let s = self.rx.borrow();
        (Arc::clone(&s.value), s.version)
    }

    /// Waits until the state is ready and answers its value.
    pub async fn wait_ready(&mut self) -> Arc<T> {
        let ready = self
            .rx
            .wait_for(|s| s.ready)
            .await
            .map(|s| Arc::clone(&s.value));
        // The state lives as long as the bus; without its sender, answer what there is.
        ready.unwrap_or_else(|_| self.get())
    }

    /// Waits for the next change (value or readiness) after the last one this reader saw.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_writer_readers_wait_for_ready_and_see_a_restart_as_a_resync() {
        let state = Arc::new(State::<Vec<u32>>::new("services"));
        let mut reader = state.reader();
        assert!(!reader.is_ready());
        let writer = state.writer().unwrap();
        assert!(state.writer().is_err(), "a second writer is refused");
        let waiting = tokio::spawn({
            let mut r = reader.clone();
            async move { r.wait_ready().await }
        });
        writer.publish(vec![1, 2]);
        let seen = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*seen, vec![1, 2]);
        writer.modify(|v| v.push(3));
        assert_eq!(*reader.get(), vec![1, 2, 3]);
        assert_eq!(reader.incarnation(), 1);

        // The writer's controller restarts: the last value stays readable, not ready, until
        // the new writer publishes again.
        drop(writer);
        let writer = state.writer().unwrap();
        assert!(!reader.is_ready());
        assert_eq!(*reader.get(), vec![1, 2, 3]);
        assert_eq!(reader.incarnation(), 2);
        writer.publish(vec![9]);
        assert_eq!(*reader.wait_ready().await, vec![9]);
    }

    #[test]
    fn every_publish_moves_the_version_and_a_restart_does_not() {
        let state = Arc::new(State::<Vec<u32>>::new("addresses"));
        let reader = state.reader();
        assert_eq!(reader.version(), 0);
        let writer = state.writer().unwrap();
        writer.publish(vec![1]);
        writer.publish(vec![1]);
        assert_eq!(
            reader.version(),
            2,
            "the same value published again is a new version"
        );
        writer.modify(|v| v.push(2));
        assert_eq!(reader.get_versioned(), (Arc::new(vec![1, 2]), 3));
        drop(writer);
        let _again = state.writer().unwrap();
        assert_eq!((reader.incarnation(), reader.version()), (2, 3));
    }
}
