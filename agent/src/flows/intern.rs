//! Reference-counted interning: many decided connections share a few addresses and servers, so
//! each stores a `u32` instead of the value (a `SocketAddr` is 32 bytes). A value is forgotten
//! when its last user releases it, so the table follows the live connections, not history.
use std::hash::Hash;

use hashbrown::HashMap;

#[derive(Debug)]
pub(super) struct Interner<T> {
    ids: HashMap<T, u32>,
    /// Value and reference count by id; a freed slot keeps its stale value until reused.
    values: Vec<(T, u32)>,
    free: Vec<u32>,
}

impl<T: Hash + Eq + Clone> Interner<T> {
    pub fn new() -> Self {
        Self {
            ids: HashMap::new(),
            values: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The id of `v`, if some user holds it.
    pub fn id(&self, v: &T) -> Option<u32> {
        self.ids.get(v).copied()
    }

    /// The id of `v`, taking one reference.
    pub fn acquire(&mut self, v: &T) -> u32 {
        if let Some(&id) = self.ids.get(v) {
            self.values[id as usize].1 += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.values[id as usize] = (v.clone(), 1);
                id
            }
            None => {
                self.values.push((v.clone(), 1));
                u32::try_from(self.values.len() - 1).expect("fewer than 2^32 interned values")
            }
        };
        self.ids.insert(v.clone(), id);
        id
    }

    pub fn get(&self, id: u32) -> &T {
        &self.values[id as usize].0
    }

    /// Drops one reference; the last one forgets the value.
    pub fn release(&mut self, id: u32) {
        let slot = &mut self.values[id as usize];
        slot.1 -= 1;
        if slot.1 == 0 {
            self.ids.remove(&slot.0);
            self.free.push(id);
        }
    }

    /// Values held by at least one user.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_lives_while_referenced_and_its_slot_is_reused() {
        let mut i = Interner::new();
        let a = i.acquire(&"a");
        assert_eq!(i.acquire(&"a"), a);
        let b = i.acquire(&"b");
        assert_ne!(a, b);
        i.release(a);
        assert_eq!(i.id(&"a"), Some(a));
        i.release(a);
        assert_eq!(i.id(&"a"), None);
        assert_eq!(i.len(), 1);
        assert_eq!(i.acquire(&"c"), a, "the freed slot is reused");
        assert_eq!(*i.get(a), "c");
        assert_eq!(*i.get(b), "b");
    }
}
