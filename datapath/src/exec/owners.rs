//! Which process opened each TCP connection, by the connection's tuple: learned from the
//! tracer's connect events, asked by the conntrack for `lb-ctl conntrack list` and the flow
//! events. Bounded: the oldest connection is forgotten first; a tuple used again (a port
//! reused) takes its new owner.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

/// A connection's tuple as its opener saw it: (source, source port, destination, port).
pub type Tuple = (IpAddr, u16, IpAddr, u16);

/// The process that opened a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_ticks: u64,
    /// The program (empty when the cache did not know the process).
    pub exe: String,
    pub comm: String,
    /// The pod of the process's cgroup (a kubelet cgroup path), when it is in one.
    pub pod_uid: Option<String>,
}

pub struct Owners {
    by_tuple: HashMap<Tuple, (u64, Owner)>,
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
            order: VecDeque::new(),
            next: 0,
            max: max.max(1),
            forgotten: 0,
        }
    }

    pub fn learn(&mut self, tuple: Tuple, owner: Owner) {
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
            exe: format!("/bin/p{pid}"),
            comm: format!("p{pid}"),
        }
    }

    #[test]
    fn owners_are_found_by_tuple_and_a_reused_tuple_takes_its_new_owner() {
        let mut w = Owners::new(10);
        w.learn(t(1000), o(1));
        w.learn(t(1001), o(2));
        assert_eq!(w.owner_of(&t(1000)).unwrap().pid, 1);
        assert_eq!(w.owner_of(&t(1001)).unwrap().exe, "/bin/p2");
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
}
