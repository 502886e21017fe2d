//! The name store: which names each client learned for each address, bounded in size.
//!
//! Entries live in a slab and sit on three intrusive lists (the whole store, the address and
//! the (client, query name) group, each least recently refreshed first), so refreshing and
//! evicting are O(1); an ordered set by expiry makes `expire` touch only what is due. Name
//! chains are interned: every address of one answer, and every client that asked the same
//! thing, share one `Arc`.

use std::{
    collections::{
        BTreeSet, HashMap,
        hash_map::{self, RandomState},
    },
    hash::{BuildHasher, Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use crate::wire::Learned;

/// A name chain as stored: the query name first, then the CNAME targets (see [`Learned`]).
pub type Names = Arc<[Arc<str>]>;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// End of an intrusive list.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Shortest lifetime of an entry, whatever the TTL (TTL 0 is common).
    pub ttl_floor_ns: u64,
    /// Longest lifetime of an entry; wins over the floor if they cross.
    pub ttl_cap_ns: u64,
    /// How long past its expiry an entry is kept while a flow to its address is open (again
    /// and again while the flow lasts).
    pub grace_ns: u64,
    /// At least 1.
    pub max_entries: usize,
    /// Addresses kept per (client, query name); at least 1.
    pub max_addresses_per_name: usize,
}

/// What a client learned about one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub client: IpAddr,
    pub addr: IpAddr,
    /// The query name, then the CNAME chain to the address.
    pub names: Names,
    /// As answered (seconds).
    pub ttl: u32,
    /// When the latest answer for it was seen.
    pub learned_ns: u64,
    pub expires_ns: u64,
    /// Kept past its TTL because a flow to `addr` was open at expiry.
    pub held: bool,
    pub resolver: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    Refreshed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entries: usize,
    /// Distinct query names (whichever clients asked).
    pub names: usize,
    pub inserted: u64,
    pub refreshed: u64,
    pub expired: u64,
    pub evicted_lru: u64,
    pub evicted_name_cap: u64,
    /// Times an entry was kept past its expiry for a live flow.
    pub held: u64,
}

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
    len: u32,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// The lists an entry is on, as indexes into [`Slot::links`].
const LRU: usize = 0;
const BY_ADDR: usize = 1;
const BY_NAME: usize = 2;

#[derive(Debug)]
struct Slot {
    entry: Entry,
    links: [Link; 3],
}

fn slot_mut(slots: &mut [Option<Slot>], id: u32) -> Option<&mut Slot> {
    slots.get_mut(id as usize).and_then(Option::as_mut)
}

fn push_back(slots: &mut [Option<Slot>], list: &mut List, order: usize, id: u32) {
    let tail = list.tail;
    if let Some(slot) = slot_mut(slots, id) {
        slot.links[order] = Link {
            prev: tail,
            next: NIL,
        };
    }
    match slot_mut(slots, tail) {
        Some(last) => last.links[order].next = id,
        None => list.head = id,
    }
    list.tail = id;
    list.len += 1;
}

fn unlink(slots: &mut [Option<Slot>], list: &mut List, order: usize, id: u32) {
    let Some(slot) = slot_mut(slots, id) else {
        return;
    };
    let Link { prev, next } = std::mem::replace(&mut slot.links[order], UNLINKED);
    match slot_mut(slots, prev) {
        Some(p) => p.links[order].next = next,
        None => list.head = next,
    }
    match slot_mut(slots, next) {
        Some(n) => n.links[order].prev = prev,
        None => list.tail = prev,
    }
    list.len = list.len.saturating_sub(1);
}

fn move_to_back(slots: &mut [Option<Slot>], list: &mut List, order: usize, id: u32) {
    unlink(slots, list, order, id);
    push_back(slots, list, order, id);
}

fn query_name(names: &Names) -> Arc<str> {
    names.first().cloned().unwrap_or_else(|| Arc::from(""))
}

pub struct NameStore {
    cfg: StoreConfig,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    by_key: HashMap<(IpAddr, IpAddr), u32>,
    by_addr: HashMap<IpAddr, List>,
    by_name: HashMap<(IpAddr, Arc<str>), List>,
    /// How many (client, name) groups each query name has.
    query_names: HashMap<Arc<str>, usize>,
    lru: List,
    by_expiry: BTreeSet<(u64, u32)>,
    /// Interned chains by hash, with how many entries hold each. On a hash collision the
    /// newcomer simply stays unshared.
    chains: HashMap<u64, (Names, usize)>,
    hasher: RandomState,
    counters: StoreStats,
}

impl NameStore {
    pub fn new(cfg: StoreConfig) -> Self {
        let cfg = StoreConfig {
            // Slot ids are u32 and NIL is taken.
            max_entries: cfg.max_entries.clamp(1, (NIL - 1) as usize),
            max_addresses_per_name: cfg.max_addresses_per_name.max(1),
            ..cfg
        };
        NameStore {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            by_name: HashMap::new(),
            query_names: HashMap::new(),
            lru: EMPTY,
            by_expiry: BTreeSet::new(),
            chains: HashMap::new(),
            hasher: RandomState::new(),
            counters: StoreStats::default(),
        }
    }

    fn lifetime_ns(&self, ttl: u32) -> u64 {
        (u64::from(ttl) * NANOS_PER_SEC)
            .max(self.cfg.ttl_floor_ns)
            .min(self.cfg.ttl_cap_ns)
    }

    fn chain_hash<'a>(&self, names: impl ExactSizeIterator<Item = &'a str>) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_usize(names.len());
        for name in names {
            name.hash(&mut h);
        }
        h.finish()
    }

    fn intern(&mut self, names: &[String]) -> Names {
        let hash = self.chain_hash(names.iter().map(String::as_str));
        let fresh = || -> Names { names.iter().map(|n| Arc::from(n.as_str())).collect() };
        match self.chains.get_mut(&hash) {
            Some((chain, holders))
                if chain.len() == names.len()
                    && chain.iter().zip(names).all(|(a, b)| **a == **b) =>
            {
                *holders += 1;
                chain.clone()
            }
            Some(_) => fresh(),
            None => {
                let chain = fresh();
                self.chains.insert(hash, (chain.clone(), 1));
                chain
            }
        }
    }

    fn release(&mut self, chain: &Names) {
        let hash = self.chain_hash(chain.iter().map(|n| &**n));
        if let Some((interned, holders)) = self.chains.get_mut(&hash)
            && Arc::ptr_eq(interned, chain)
        {
            *holders -= 1;
            if *holders == 0 {
                self.chains.remove(&hash);
            }
        }
    }

    fn entry(&self, id: u32) -> Option<&Entry> {
        self.slots
            .get(id as usize)
            .and_then(Option::as_ref)
            .map(|s| &s.entry)
    }

    /// Records what `client` learned from `resolver`: a new entry for (client, address), or the
    /// existing one refreshed with the new names, TTL and expiry.
    pub fn insert(
        &mut self,
        client: IpAddr,
        resolver: IpAddr,
        learned: &Learned,
        now_ns: u64,
    ) -> Inserted {
        let expires_ns = now_ns.saturating_add(self.lifetime_ns(learned.ttl));
        // Interned before any eviction, which might otherwise free the very chain.
        let names = self.intern(&learned.names);
        if let Some(&id) = self.by_key.get(&(client, learned.addr)) {
            self.refresh(id, names, resolver, learned.ttl, now_ns, expires_ns);
            self.counters.refreshed += 1;
            return Inserted::Refreshed;
        }

        let group_key = (client, query_name(&names));
        self.make_room_in_group(&group_key);
        if self.by_key.len() >= self.cfg.max_entries {
            let oldest = self.lru.head;
            self.remove(oldest);
            self.counters.evicted_lru += 1;
        }

        let entry = Entry {
            client,
            addr: learned.addr,
            names,
            ttl: learned.ttl,
            learned_ns: now_ns,
            expires_ns,
            held: false,
            resolver,
        };
        let slot = Slot {
            entry,
            links: [UNLINKED; 3],
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        };
        push_back(&mut self.slots, &mut self.lru, LRU, id);
        let addr_list = self.by_addr.entry(learned.addr).or_insert(EMPTY);
        push_back(&mut self.slots, addr_list, BY_ADDR, id);
        self.join_group(group_key, id);
        self.by_key.insert((client, learned.addr), id);
        self.by_expiry.insert((expires_ns, id));
        self.counters.inserted += 1;
        Inserted::New
    }

    fn join_group(&mut self, key: (IpAddr, Arc<str>), id: u32) {
        let group = match self.by_name.entry(key) {
            hash_map::Entry::Occupied(o) => o.into_mut(),
            hash_map::Entry::Vacant(v) => {
                *self.query_names.entry(v.key().1.clone()).or_insert(0) += 1;
                v.insert(EMPTY)
            }
        };
        push_back(&mut self.slots, group, BY_NAME, id);
    }

    fn leave_group(&mut self, key: &(IpAddr, Arc<str>), id: u32) {
        let Some(group) = self.by_name.get_mut(key) else {
            return;
        };
        unlink(&mut self.slots, group, BY_NAME, id);
        if group.len > 0 {
            return;
        }
        self.by_name.remove(key);
        if let Some(groups) = self.query_names.get_mut(&key.1) {
            *groups -= 1;
            if *groups == 0 {
                self.query_names.remove(&key.1);
            }
        }
    }

    /// At the per-name cap, the group's least recently refreshed entry goes.
    fn make_room_in_group(&mut self, group_key: &(IpAddr, Arc<str>)) {
        let Some(group) = self.by_name.get(group_key) else {
            return;
        };
        if group.len as usize >= self.cfg.max_addresses_per_name {
            let oldest = group.head;
            self.remove(oldest);
            self.counters.evicted_name_cap += 1;
        }
    }

    fn refresh(
        &mut self,
        id: u32,
        names: Names,
        resolver: IpAddr,
        ttl: u32,
        now_ns: u64,
        expires_ns: u64,
    ) {
        let Some(slot) = slot_mut(&mut self.slots, id) else {
            return;
        };
        let client = slot.entry.client;
        let addr = slot.entry.addr;
        let old_names = std::mem::replace(&mut slot.entry.names, names.clone());
        let old_expires = std::mem::replace(&mut slot.entry.expires_ns, expires_ns);
        slot.entry.ttl = ttl;
        slot.entry.learned_ns = now_ns;
        slot.entry.held = false;
        slot.entry.resolver = resolver;

        self.by_expiry.remove(&(old_expires, id));
        self.by_expiry.insert((expires_ns, id));
        move_to_back(&mut self.slots, &mut self.lru, LRU, id);
        if let Some(list) = self.by_addr.get_mut(&addr) {
            move_to_back(&mut self.slots, list, BY_ADDR, id);
        }
        let old_group = (client, query_name(&old_names));
        let new_group = (client, query_name(&names));
        self.release(&old_names);
        if old_group == new_group {
            if let Some(group) = self.by_name.get_mut(&new_group) {
                move_to_back(&mut self.slots, group, BY_NAME, id);
            }
            return;
        }
        // Asked under another name now: it moves to that name's group.
        self.leave_group(&old_group, id);
        self.make_room_in_group(&new_group);
        self.join_group(new_group, id);
    }

    fn remove(&mut self, id: u32) {
        let Some(slot) = self.slots.get(id as usize).and_then(Option::as_ref) else {
            return;
        };
        let client = slot.entry.client;
        let addr = slot.entry.addr;
        let expires = slot.entry.expires_ns;
        let group_key = (client, query_name(&slot.entry.names));
        unlink(&mut self.slots, &mut self.lru, LRU, id);
        if let Some(list) = self.by_addr.get_mut(&addr) {
            unlink(&mut self.slots, list, BY_ADDR, id);
            if list.len == 0 {
                self.by_addr.remove(&addr);
            }
        }
        self.leave_group(&group_key, id);
        self.by_key.remove(&(client, addr));
        self.by_expiry.remove(&(expires, id));
        if let Some(slot) = self.slots[id as usize].take() {
            self.release(&slot.entry.names);
        }
        self.free.push(id);
    }

    /// The entry for (client, addr); else the most recently learned entry of any client for
    /// addr. Entries past their expiry stay visible until [`NameStore::expire`] removes them.
    pub fn lookup(&self, client: Option<IpAddr>, addr: IpAddr) -> Option<&Entry> {
        if let Some(client) = client
            && let Some(&id) = self.by_key.get(&(client, addr))
        {
            return self.entry(id);
        }
        self.by_addr.get(&addr).and_then(|l| self.entry(l.tail))
    }

    /// Every client's entry for addr, the most recently learned first.
    pub fn lookup_all(&self, addr: IpAddr) -> Vec<&Entry> {
        let mut all = Vec::new();
        let mut id = self.by_addr.get(&addr).map_or(NIL, |l| l.tail);
        while let Some(slot) = self.slots.get(id as usize).and_then(Option::as_ref) {
            all.push(&slot.entry);
            id = slot.links[BY_ADDR].prev;
        }
        all
    }

    /// Earliest expiry among entries (None when empty): the caller only asks the conntrack
    /// for live addresses when this is <= now.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_expiry.first().map(|&(expires, _)| expires)
    }

    /// Entries past their expiry: removed, unless `live(addr)` says a flow to addr is open, in
    /// which case they are kept until now + grace (`held`), when the same rule applies again.
    /// Answers how many were removed.
    pub fn expire(&mut self, now_ns: u64, live: &dyn Fn(IpAddr) -> bool) -> usize {
        let due: Vec<(u64, u32)> = self
            .by_expiry
            .range(..=(now_ns, u32::MAX))
            .copied()
            .collect();
        let hold_until = now_ns.saturating_add(self.cfg.grace_ns);
        let mut removed = 0;
        for (expires, id) in due {
            let Some(slot) = slot_mut(&mut self.slots, id) else {
                continue;
            };
            if live(slot.entry.addr) {
                slot.entry.expires_ns = hold_until;
                slot.entry.held = true;
                self.by_expiry.remove(&(expires, id));
                self.by_expiry.insert((hold_until, id));
                self.counters.held += 1;
            } else {
                self.remove(id);
                self.counters.expired += 1;
                removed += 1;
            }
        }
        removed
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().flatten().map(|s| &s.entry)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            entries: self.by_key.len(),
            names: self.query_names.len(),
            ..self.counters
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const SEC: u64 = NANOS_PER_SEC;
    const RESOLVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, last))
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn config() -> StoreConfig {
        StoreConfig {
            ttl_floor_ns: 30 * SEC,
            ttl_cap_ns: 3600 * SEC,
            grace_ns: 60 * SEC,
            max_entries: 100,
            max_addresses_per_name: 4,
        }
    }

    fn learned(addr: IpAddr, names: &[&str], ttl: u32) -> Learned {
        Learned {
            addr,
            names: names.iter().map(|n| n.to_string()).collect(),
            ttl,
        }
    }

    fn names(list: &[&str]) -> Names {
        list.iter().map(|n| Arc::from(*n)).collect()
    }

    fn entry(
        c: IpAddr,
        addr: IpAddr,
        list: &[&str],
        ttl: u32,
        learned_ns: u64,
        expires_ns: u64,
    ) -> Entry {
        Entry {
            client: c,
            addr,
            names: names(list),
            ttl,
            learned_ns,
            expires_ns,
            held: false,
            resolver: RESOLVER,
        }
    }

    fn sorted(store: &NameStore) -> Vec<Entry> {
        let mut all: Vec<Entry> = store.iter().cloned().collect();
        all.sort_by_key(|e| (e.client, e.addr));
        all
    }

    fn never(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn insert_then_refresh() {
        let mut s = NameStore::new(config());
        let first = learned(ip(1), &["www.example.com"], 300);
        assert_eq!(
            s.insert(client(1), RESOLVER, &first, 10 * SEC),
            Inserted::New
        );
        assert_eq!(
            s.lookup(Some(client(1)), ip(1)),
            Some(&entry(
                client(1),
                ip(1),
                &["www.example.com"],
                300,
                10 * SEC,
                310 * SEC
            ))
        );
        let again = learned(ip(1), &["api.example.com", "edge.cdn.net"], 100);
        assert_eq!(
            s.insert(client(1), RESOLVER, &again, 20 * SEC),
            Inserted::Refreshed
        );
        assert_eq!(
            sorted(&s),
            vec![entry(
                client(1),
                ip(1),
                &["api.example.com", "edge.cdn.net"],
                100,
                20 * SEC,
                120 * SEC
            )]
        );
        assert_eq!(s.next_expiry(), Some(120 * SEC));
        assert_eq!(
            s.stats(),
            StoreStats {
                entries: 1,
                names: 1,
                inserted: 1,
                refreshed: 1,
                ..StoreStats::default()
            }
        );
    }

    #[test]
    fn ttl_floor_and_cap() {
        let mut s = NameStore::new(config());
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(1), &["zero.example"], 0),
            SEC,
        );
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(2), &["long.example"], u32::MAX),
            SEC,
        );
        assert_eq!(
            s.lookup(Some(client(1)), ip(1)).map(|e| e.expires_ns),
            Some(31 * SEC)
        );
        assert_eq!(
            s.lookup(Some(client(1)), ip(2)).map(|e| e.expires_ns),
            Some(3601 * SEC)
        );
        assert_eq!(
            s.lookup(Some(client(1)), ip(2)).map(|e| e.ttl),
            Some(u32::MAX)
        );
    }

    #[test]
    fn the_name_cap_evicts_the_least_recently_refreshed_address() {
        let mut s = NameStore::new(StoreConfig {
            max_addresses_per_name: 2,
            ..config()
        });
        let name = ["pool.example"];
        s.insert(client(1), RESOLVER, &learned(ip(1), &name, 60), 0);
        s.insert(client(1), RESOLVER, &learned(ip(2), &name, 60), 1);
        // Another client's addresses for the same name are its own.
        s.insert(client(2), RESOLVER, &learned(ip(3), &name, 60), 2);
        s.insert(client(1), RESOLVER, &learned(ip(1), &name, 60), 3);
        s.insert(client(1), RESOLVER, &learned(ip(4), &name, 60), 4);
        let kept: Vec<(IpAddr, IpAddr)> = sorted(&s).iter().map(|e| (e.client, e.addr)).collect();
        assert_eq!(
            kept,
            vec![(client(1), ip(1)), (client(1), ip(4)), (client(2), ip(3))]
        );
        assert_eq!(s.stats().evicted_name_cap, 1);
        // One name, asked by two clients.
        assert_eq!(s.stats().names, 1);
    }

    #[test]
    fn a_refresh_under_another_name_moves_to_its_group() {
        let mut s = NameStore::new(StoreConfig {
            max_addresses_per_name: 1,
            ..config()
        });
        s.insert(client(1), RESOLVER, &learned(ip(1), &["a.example"], 60), 0);
        s.insert(client(1), RESOLVER, &learned(ip(2), &["b.example"], 60), 1);
        s.insert(client(1), RESOLVER, &learned(ip(1), &["b.example"], 60), 2);
        assert_eq!(
            sorted(&s),
            vec![entry(client(1), ip(1), &["b.example"], 60, 2, 2 + 60 * SEC)]
        );
        assert_eq!(s.stats().evicted_name_cap, 1);
        assert_eq!(s.stats().names, 1);
    }

    #[test]
    fn lru_eviction_at_max_entries() {
        let mut s = NameStore::new(StoreConfig {
            max_entries: 2,
            ..config()
        });
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(1), &["one.example"], 60),
            0,
        );
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(2), &["two.example"], 60),
            1,
        );
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(1), &["one.example"], 60),
            2,
        );
        assert_eq!(
            s.insert(
                client(1),
                RESOLVER,
                &learned(ip(3), &["three.example"], 60),
                3
            ),
            Inserted::New
        );
        let kept: Vec<IpAddr> = sorted(&s).iter().map(|e| e.addr).collect();
        assert_eq!(kept, vec![ip(1), ip(3)]);
        assert_eq!(s.stats().evicted_lru, 1);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn expire_without_live_flows() {
        let mut s = NameStore::new(config());
        s.insert(client(1), RESOLVER, &learned(ip(1), &["a.example"], 60), 0);
        s.insert(client(1), RESOLVER, &learned(ip(2), &["b.example"], 120), 0);
        assert_eq!(s.next_expiry(), Some(60 * SEC));
        assert_eq!(s.expire(59 * SEC, &never), 0);
        assert_eq!(s.expire(60 * SEC, &never), 1);
        assert_eq!(s.lookup(None, ip(1)), None);
        assert_eq!(s.next_expiry(), Some(120 * SEC));
        assert_eq!(s.expire(500 * SEC, &never), 1);
        assert!(s.is_empty());
        assert_eq!(s.next_expiry(), None);
        assert_eq!(s.stats().expired, 2);
        assert_eq!(s.stats().names, 0);
    }

    #[test]
    fn a_live_flow_holds_an_entry_for_the_grace_period() {
        let mut s = NameStore::new(config());
        s.insert(client(1), RESOLVER, &learned(ip(1), &["a.example"], 60), 0);
        let live = |addr: IpAddr| addr == ip(1);
        assert_eq!(s.expire(61 * SEC, &live), 0);
        assert_eq!(
            s.lookup(Some(client(1)), ip(1)),
            Some(&Entry {
                held: true,
                ..entry(client(1), ip(1), &["a.example"], 60, 0, 121 * SEC)
            })
        );
        assert_eq!(s.next_expiry(), Some(121 * SEC));
        // Still live at the end of the grace: held again.
        assert_eq!(s.expire(121 * SEC, &live), 0);
        assert_eq!(s.next_expiry(), Some(181 * SEC));
        // The flow is gone: removed at the end of the grace, not before.
        assert_eq!(s.expire(180 * SEC, &never), 0);
        assert_eq!(s.expire(181 * SEC, &never), 1);
        assert!(s.is_empty());
        assert_eq!(s.stats().held, 2);
        assert_eq!(s.stats().expired, 1);
    }

    #[test]
    fn lookup_falls_back_to_the_latest_other_client() {
        let mut s = NameStore::new(config());
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(1), &["first.example"], 60),
            0,
        );
        s.insert(
            client(2),
            RESOLVER,
            &learned(ip(1), &["second.example"], 60),
            1,
        );
        s.insert(
            client(3),
            RESOLVER,
            &learned(ip(9), &["other.example"], 60),
            2,
        );
        let name_of = |e: Option<&Entry>| e.map(|e| e.names[0].to_string());
        assert_eq!(
            name_of(s.lookup(Some(client(1)), ip(1))),
            Some("first.example".into())
        );
        assert_eq!(
            name_of(s.lookup(Some(client(3)), ip(1))),
            Some("second.example".into())
        );
        assert_eq!(
            name_of(s.lookup(None, ip(1))),
            Some("second.example".into())
        );
        assert_eq!(s.lookup(None, ip(2)), None);
        // A refresh makes client 1's the latest.
        s.insert(
            client(1),
            RESOLVER,
            &learned(ip(1), &["first.example"], 60),
            3,
        );
        assert_eq!(name_of(s.lookup(None, ip(1))), Some("first.example".into()));
        let all: Vec<IpAddr> = s.lookup_all(ip(1)).iter().map(|e| e.client).collect();
        assert_eq!(all, vec![client(1), client(2)]);
    }

    #[test]
    fn chains_are_shared() {
        let mut s = NameStore::new(config());
        let chain = ["www.example.com", "edge.cdn.net"];
        s.insert(client(1), RESOLVER, &learned(ip(1), &chain, 60), 0);
        s.insert(client(1), RESOLVER, &learned(ip(2), &chain, 60), 0);
        s.insert(client(2), RESOLVER, &learned(ip(1), &chain, 60), 0);
        let a = s.lookup(Some(client(1)), ip(1)).unwrap();
        let b = s.lookup(Some(client(1)), ip(2)).unwrap();
        let c = s.lookup(Some(client(2)), ip(1)).unwrap();
        assert!(Arc::ptr_eq(&a.names, &b.names) && Arc::ptr_eq(&a.names, &c.names));
        s.expire(u64::MAX, &never);
        assert!(s.chains.is_empty());
        assert!(s.by_addr.is_empty() && s.by_name.is_empty() && s.by_expiry.is_empty());
        assert!(s.query_names.is_empty());
    }
}
