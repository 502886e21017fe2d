//! Which process opened each TCP connection, by the connection's tuple: learned from the
//! tracer's connect events, asked by the conntrack for `lb-ctl conntrack list` and the flow
//! events. Bounded: the oldest connection is forgotten first; a tuple used again (a port
//! reused) takes its new owner.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use super::intern::Interner;

/// A connection's tuple as its opener saw it: (source, source port, destination, port).
pub type Tuple = (IpAddr, u16, IpAddr, u16);

/// The process that opened a connection. Its strings are shared (a clone is three reference
/// counts): the graph asks for the owner of every flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
    /// The program (empty when the cache did not know the process).
    pub exe: Arc<str>,
    pub comm: Arc<str>,
    /// The pod of the process's cgroup (a kubelet cgroup path), when it is in one.
    pub pod_uid: Option<Arc<str>>,
}

pub struct Owners {
    by_tuple: HashMap<Tuple, (u64, Owner)>,
    /// The connections of a program share its strings, so a reader's clone touches one hot
    /// reference count rather than a cold allocation per connection.
    strings: Interner,
    /// Tuples in the order learned, with the sequence number that learned them (a later
    /// relearn makes an older entry here stale).
    order: VecDeque<(u64, Tuple)>,
    next: u64,
    max: usize,
    forgotten: u64,
}

impl Owners {
    pub fn new(max: usize) -> Self {
        Self {
            by_tuple: HashMap::new(),
            strings: Interner::default(),
            order: VecDeque::new(),
            next: 0,
            max: max.max(1),
            forgotten: 0,
        }
    }

    pub fn learn(&mut self, tuple: Tuple, mut owner: Owner) {
        owner.exe = self.strings.intern(owner.exe);
        owner.comm = self.strings.intern(owner.comm);
        owner.pod_uid = owner.pod_uid.map(|p| self.strings.intern(p));
        self.next += 1;
        self.by_tuple.insert(tuple, (self.next, owner));
        self.order.push_back((self.next, tuple));
        while self.by_tuple.len() > self.max {
            let Some((seq, t)) = self.order.pop_front() else {
                break;
            };
            if self.by_tuple.get(&t).is_some_and(|(s, _)| *s == seq) {
                self.by_tuple.remove(&t);
                self.forgotten += 1;
            }
        }
        // Stale order entries (relearned tuples) never outnumber the live ones by much.
        if self.order.len() > 2 * self.max {
            let live = &self.by_tuple;
            self.order
                .retain(|(seq, t)| live.get(t).is_some_and(|(s, _)| s == seq));
        }
    }

    pub fn owner_of(&self, tuple: &Tuple) -> Option<&Owner> {
        self.by_tuple.get(tuple).map(|(_, o)| o)
    }

    pub fn len(&self) -> usize {
        self.by_tuple.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tuple.is_empty()
    }

    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Distinct strings the owners share (for tests and memory figures).
    pub fn shared_strings(&self) -> usize {
        self.strings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(port: u16) -> Tuple {
        (
            "198.18.0.1".parse().unwrap(),
            port,
            "198.18.100.1".parse().unwrap(),
            80,
        )
    }

    fn o(pid: u32) -> Owner {
        Owner {
            pod_uid: None,
            pid,
            start_ticks: 1,
            exe: format!("/bin/p{pid}").into(),
            comm: format!("p{pid}").into(),
        }
    }

    #[test]
    fn owners_are_found_by_tuple_and_a_reused_tuple_takes_its_new_owner() {
        let mut w = Owners::new(10);
        w.learn(t(1000), o(1));
        w.learn(t(1001), o(2));
        assert_eq!(w.owner_of(&t(1000)).unwrap().pid, 1);
        assert_eq!(&*w.owner_of(&t(1001)).unwrap().exe, "/bin/p2");
        assert!(w.owner_of(&t(1002)).is_none());
        w.learn(t(1000), o(3));
        assert_eq!(w.owner_of(&t(1000)).unwrap().pid, 3);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn the_oldest_is_forgotten_first_and_relearning_refreshes() {
        let mut w = Owners::new(3);
        for p in 0..3 {
            w.learn(t(p), o(u32::from(p)));
        }
        // Relearned: now the newest.
        w.learn(t(0), o(9));
        w.learn(t(10), o(10));
        assert!(w.owner_of(&t(1)).is_none(), "the oldest went");
        assert_eq!(w.owner_of(&t(0)).unwrap().pid, 9);
        assert_eq!(w.len(), 3);
        assert_eq!(w.forgotten(), 1);
        // Many relearns of one tuple keep the order list bounded.
        for _ in 0..100 {
            w.learn(t(0), o(9));
        }
        assert!(w.order.len() <= 6, "{}", w.order.len());
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn the_connections_of_a_program_share_its_strings_and_unused_ones_are_pruned() {
        let mut w = Owners::new(100_000);
        w.learn(t(1), o(7));
        w.learn(t(2), o(7));
        let (a, b) = (w.owner_of(&t(1)).unwrap(), w.owner_of(&t(2)).unwrap());
        assert!(Arc::ptr_eq(&a.exe, &b.exe) && Arc::ptr_eq(&a.comm, &b.comm));
        assert_eq!(w.shared_strings(), 2);
        // Programs seen once each, then forgotten as their tuples are relearned by one other:
        // the set is pruned, not grown without bound.
        for pid in 0..5_000 {
            w.learn(t(3), o(100 + pid));
        }
        assert!(
            w.shared_strings() < 2 * super::super::intern::PRUNE_MIN + 8,
            "{}",
            w.shared_strings()
        );
        assert_eq!(&*w.owner_of(&t(3)).unwrap().exe, "/bin/p5099");
        assert_eq!(&*w.owner_of(&t(1)).unwrap().exe, "/bin/p7");
    }
}
