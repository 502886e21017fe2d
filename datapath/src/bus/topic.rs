//! Event topics: every event goes to every subscriber, through a bounded buffer per
//! subscriber. A publisher never waits: when a subscriber's buffer is full its oldest event is
//! dropped and counted as lost for that subscriber, so one slow reader costs nobody else.
use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscriber's buffer.
struct Slot<T> {
    subscriber: &'static str,
    queue: Mutex<VecDeque<T>>,
    notify: Notify,
    received: AtomicU64,
    lost: AtomicU64,
}

/// Counts of one subscriber name (several subscribers may share a name, e.g. API followers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberCounts {
    /// Events handed to the subscriber's buffer and not lost.
    pub delivered: u64,
    /// Events dropped because the subscriber's buffer was full.
    pub lost: u64,
}

/// An event topic carrying `T`. See the module documentation.
pub struct Topic<T> {
    name: &'static str,
    capacity: usize,
    slots: RwLock<Vec<Arc<Slot<T>>>>,
    published: AtomicU64,
    /// Counts of subscribers that are gone, kept so that the counters never go down.
    retired: Mutex<BTreeMap<&'static str, SubscriberCounts>>,
}

/// What `/metrics` reads of a topic, whatever it carries.
pub trait TopicStats: Send + Sync {
    fn name(&self) -> &'static str;
    fn published(&self) -> u64;
    /// Per subscriber name: delivered and lost, live and gone subscribers together.
    fn subscribers(&self) -> BTreeMap<&'static str, SubscriberCounts>;
}

impl<T: Clone + Send + Sync + 'static> Topic<T> {
    pub(crate) fn new(name: &'static str, capacity: usize) -> Self {
        Self {
            name,
            capacity: capacity.max(1),
            slots: RwLock::new(Vec::new()),
            published: AtomicU64::new(0),
            retired: Mutex::new(BTreeMap::new()),
        }
    }

    /// A new subscriber, receiving the events published from now on. `subscriber` names it
    /// in the loss counters (a bounded set of names: a kind of reader, not one per request).
    pub fn subscribe(self: &Arc<Self>, subscriber: &'static str) -> Subscriber<T> {
        let slot = Arc::new(Slot {
            subscriber,
            queue: Mutex::new(VecDeque::with_capacity(self.capacity.min(1024))),
            notify: Notify::new(),
            received: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        self.slots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&slot));
        Subscriber {
            topic: Arc::clone(self),
            slot,
        }
    }

    /// Sends `event` to every subscriber.
    pub fn publish(&self, event: T) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let Some((last, others)) = slots.split_last() else {
            return;
        };
        for slot in others {
            self.push(slot, event.clone());
        }
        self.push(last, event);
    }

    /// Sends `events`, in order, to every subscriber: one lock and one wake-up per subscriber
    /// for the whole batch (a ring buffer's records of one wake-up, say), which is what makes
    /// the bus cheap per event. Losses are counted as for [`Topic::publish`].
    pub fn publish_batch(&self, events: Vec<T>) {
        if events.is_empty() {
            return;
        }
        self.published
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let Some((last, others)) = slots.split_last() else {
            return;
        };
        for slot in others {
            self.push_all(slot, events.iter().cloned());
        }
        self.push_all(last, events.into_iter());
    }

    fn push_all(&self, slot: &Slot<T>, events: impl ExactSizeIterator<Item = T>) {
        let incoming = events.len();
        // Of a batch larger than the buffer only its newest `capacity` events can stay.
        let skip = incoming.saturating_sub(self.capacity);
        {
            let mut queue = lock(&slot.queue);
            let room = self.capacity - (incoming - skip);
            let evicted = queue.len().saturating_sub(room);
            queue.drain(..evicted);
            queue.extend(events.skip(skip));
            slot.lost
                .fetch_add((skip + evicted) as u64, Ordering::Relaxed);
        }
        slot.notify.notify_one();
    }

    fn push(&self, slot: &Slot<T>, event: T) {
        {
            let mut queue = lock(&slot.queue);
            if queue.len() >= self.capacity {
                queue.pop_front();
                slot.lost.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(event);
        }
        slot.notify.notify_one();
    }

    pub fn subscriber_count(&self) -> usize {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<T: Clone + Send + Sync + 'static> TopicStats for Topic<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    fn subscribers(&self) -> BTreeMap<&'static str, SubscriberCounts> {
        let mut all = lock(&self.retired).clone();
        for slot in self.slots.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let c = all.entry(slot.subscriber).or_default();
            c.delivered += slot.received.load(Ordering::Relaxed);
            c.lost += slot.lost.load(Ordering::Relaxed);
        }
        all
    }
}

/// A subscription to a [`Topic`]; dropping it unsubscribes.
pub struct Subscriber<T: Clone + Send + Sync + 'static> {
    topic: Arc<Topic<T>>,
    slot: Arc<Slot<T>>,
}

impl<T: Clone + Send + Sync + 'static> Subscriber<T> {
    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> T {
        loop {
            if let Some(event) = self.try_recv() {
                return event;
            }
            // A publish between the check and here leaves a permit: no wake-up is missed.
            self.slot.notify.notified().await;
        }
    }

    /// The next event if one is buffered.
    pub fn try_recv(&mut self) -> Option<T> {
        let event = lock(&self.slot.queue).pop_front();
        if event.is_some() {
            self.slot.received.fetch_add(1, Ordering::Relaxed);
        }
        event
    }

    /// Moves up to `max` buffered events into `out`, waiting for at least one.
    pub async fn recv_many(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        loop {
            let n = {
                let mut queue = lock(&self.slot.queue);
                let n = queue.len().min(max);
                out.extend(queue.drain(..n));
                n
            };
            if n > 0 {
                self.slot.received.fetch_add(n as u64, Ordering::Relaxed);
                return n;
            }
            self.slot.notify.notified().await;
        }
    }

    /// Events this subscriber lost so far.
    pub fn lost(&self) -> u64 {
        self.slot.lost.load(Ordering::Relaxed)
    }
}

impl<T: Clone + Send + Sync + 'static> Drop for Subscriber<T> {
    fn drop(&mut self) {
        let mut slots = self.topic.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
        drop(slots);
        let mut retired = lock(&self.topic.retired);
        let c = retired.entry(self.slot.subscriber).or_default();
        c.delivered += self.slot.received.load(Ordering::Relaxed);
        c.lost += self.slot.lost.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_subscriber_gets_every_event_and_a_slow_one_loses_exactly_the_overflow() {
        let topic = Arc::new(Topic::<u64>::new("flows", 4));
        let mut fast = topic.subscribe("fast");
        let mut slow = topic.subscribe("slow");
        for i in 0..3 {
            topic.publish(i);
            assert_eq!(fast.recv().await, i);
        }
        // `slow` read nothing: 6 events into its 4 slots push out the oldest 2.
        for i in 3..6 {
            topic.publish(i);
            assert_eq!(fast.recv().await, i);
        }
        assert_eq!(slow.lost(), 2);
        let mut got = Vec::new();
        slow.recv_many(&mut got, 10).await;
        assert_eq!(got, vec![2, 3, 4, 5], "the newest events are kept");
        let stats = topic.subscribers();
        assert_eq!(
            stats["fast"],
            SubscriberCounts {
                delivered: 6,
                lost: 0
            }
        );
        assert_eq!(
            stats["slow"],
            SubscriberCounts {
                delivered: 4,
                lost: 2
            }
        );
        assert_eq!(topic.published(), 6);
        assert_eq!(
            stats["slow"].delivered + stats["slow"].lost,
            topic.published(),
            "every event is either delivered or counted lost"
        );

        // Counts survive the subscriber.
        drop(slow);
        assert_eq!(topic.subscriber_count(), 1);
        assert_eq!(topic.subscribers()["slow"].lost, 2);
    }

    #[tokio::test]
    async fn a_batch_reaches_every_subscriber_in_order_and_overflow_is_counted_exactly() {
        let topic = Arc::new(Topic::<u64>::new("flows", 4));
        let mut a = topic.subscribe("a");
        let mut b = topic.subscribe("b");
        topic.publish_batch(vec![0, 1, 2]);
        let mut got = Vec::new();
        a.recv_many(&mut got, 10).await;
        assert_eq!(got, [0, 1, 2]);
        // `b` holds 0..3; a batch of 6 keeps only the newest 4 of all: 5..9.
        topic.publish_batch((3..9).collect());
        let mut got = Vec::new();
        b.recv_many(&mut got, 10).await;
        assert_eq!(got, [5, 6, 7, 8]);
        assert_eq!(b.lost(), 5, "0..3 evicted and 3, 4 skipped");
        let mut got = Vec::new();
        a.recv_many(&mut got, 10).await;
        assert_eq!(got, [5, 6, 7, 8]);
        assert_eq!(a.lost(), 2);
        assert_eq!(topic.published(), 9);
        for counts in topic.subscribers().values() {
            assert_eq!(counts.delivered + counts.lost, 9);
        }
    }

    #[tokio::test]
    async fn a_waiting_subscriber_wakes_for_an_event_published_from_another_task() {
        let topic = Arc::new(Topic::<String>::new("dns", 16));
        let mut sub = topic.subscribe("test");
        let t = Arc::clone(&topic);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.publish("answer".into());
        });
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap();
        assert_eq!(got, "answer");
    }
}
