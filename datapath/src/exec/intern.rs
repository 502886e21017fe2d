//! One shared copy of each string the exec module keeps many times over (programs, commands,
//! pod uids): a process or connection holds a reference count, not an allocation of its own.
use std::{collections::HashSet, sync::Arc};

/// The set's size that first triggers a prune.
pub(super) const PRUNE_MIN: usize = 1024;

/// Strings no holder keeps any more are dropped when the set has doubled since it was last
/// pruned, so the set stays within about twice the strings in use.
#[derive(Default)]
pub struct Interner {
    strings: HashSet<Arc<str>, foldhash::fast::RandomState>,
    prune_at: usize,
}

impl Interner {
    /// The shared copy of `s` (`s` itself when it is new).
    pub fn intern(&mut self, s: Arc<str>) -> Arc<str> {
        if let Some(shared) = self.strings.get(&*s) {
            return Arc::clone(shared);
        }
        self.insert(Arc::clone(&s));
        s
    }

    /// The shared copy of `s`, allocated only when no holder has it yet.
    pub fn intern_str(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return Arc::clone(shared);
        }
        let new: Arc<str> = Arc::from(s);
        self.insert(Arc::clone(&new));
        new
    }

    fn insert(&mut self, s: Arc<str>) {
        self.strings.insert(s);
        if self.strings.len() > self.prune_at.max(PRUNE_MIN) {
            // Held only here: nothing names it any more.
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.prune_at = 2 * self.strings.len();
        }
    }

    /// Distinct strings kept (for tests and memory figures).
    pub fn len(&self) -> usize {
        self.strings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_string_and_unheld_ones_are_pruned() {
        let mut i = Interner::default();
        let a = i.intern_str("/bin/a");
        let b = i.intern(Arc::from("/bin/a"));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        // Past the first prune threshold, the unheld "/bin/a" goes; held strings stay.
        let held: Vec<Arc<str>> = (0..PRUNE_MIN)
            .map(|n| i.intern_str(&format!("/bin/p{n}")))
            .collect();
        assert_eq!(i.len(), PRUNE_MIN, "pruned once past {PRUNE_MIN}");
        assert!(Arc::ptr_eq(&held[7], &i.intern_str("/bin/p7")));
    }
}
