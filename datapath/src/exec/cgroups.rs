//! The cgroup names the exec module has looked up, by cgroup id, bounded.

use std::{collections::HashMap, sync::Arc};

use super::cache::Cgroup;

/// Cgroup id -> its path under the cgroup2 root and its pod (`None`: looked for, not found).
///
/// A node that churns pods makes new cgroups forever, so the table is bounded: when it holds
/// `max` ids, it forgets the ones that nothing else holds (no cached process is in them, no
/// event in flight names them) and the ones never found. The cached processes' cgroups stay,
/// so with `max` at twice the process cache's capacity a prune frees at least half.
pub(super) struct CgroupNames {
    by_id: HashMap<u64, Option<Arc<Cgroup>>>,
    max: usize,
}

impl CgroupNames {
    pub(super) fn new(max: usize) -> Self {
        Self {
            by_id: HashMap::new(),
            max: max.max(1),
        }
    }

    /// What is known of `id`: `None` when it was never looked up.
    pub(super) fn get(&self, id: u64) -> Option<Option<Arc<Cgroup>>> {
        self.by_id.get(&id).cloned()
    }

    /// Remembers what a lookup of `id` found; when the table is full, first forgets what
    /// nothing else holds, and remembers nothing if that frees no room.
    pub(super) fn remember(&mut self, id: u64, found: Option<Arc<Cgroup>>) {
        if self.by_id.len() >= self.max {
            self.by_id
                .retain(|_, c| c.as_ref().is_some_and(|c| Arc::strong_count(c) > 1));
        }
        if self.by_id.len() < self.max {
            self.by_id.insert(id, found);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_forgets_the_cgroups_nothing_holds_and_keeps_the_rest() {
        let mut names = CgroupNames::new(4);
        let held = Cgroup::new("/kubepods/pod1/c1");
        names.remember(1, Some(Arc::clone(&held)));
        names.remember(2, Some(Cgroup::new("/gone/a")));
        names.remember(3, None);
        names.remember(4, Some(Cgroup::new("/gone/b")));
        assert_eq!(names.len(), 4);
        // Full: the fifth prunes 2, 3 and 4 (only the table held them), keeps 1.
        names.remember(5, Some(Cgroup::new("/new")));
        assert_eq!(names.len(), 2);
        assert_eq!(
            names.get(1).flatten().map(|c| c.path.to_string()),
            Some("/kubepods/pod1/c1".to_string())
        );
        assert!(names.get(2).is_none());
        assert!(names.get(3).is_none());
        assert!(names.get(5).is_some());
    }

    #[test]
    fn a_table_full_of_held_cgroups_stays_bounded() {
        let mut names = CgroupNames::new(3);
        let held: Vec<_> = (0..3).map(|i| Cgroup::new(&format!("/held/{i}"))).collect();
        for (i, c) in held.iter().enumerate() {
            names.remember(i as u64, Some(Arc::clone(c)));
        }
        names.remember(10, Some(Cgroup::new("/more")));
        assert_eq!(names.len(), 3);
        assert!(names.get(10).is_none(), "no room: not remembered");
        assert!(names.get(0).is_some());
    }
}
