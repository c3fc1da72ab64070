//! Containers: [`Sequential`], [`ModuleList`] and [`ModuleDict`], with PyTorch's naming,
//! indexing and ordering rules.
//!
//! Each container keeps its children in a [`ChildStore`], an ordered list of
//! `(name, Arc<dyn Module>)` that the container reports to the module system as its declared
//! fields. Traversal, state dicts, hooks and reprs therefore treat the children like any other,
//! in PyTorch's `_modules` order. A child shared twice (the same `Arc`) is visited once by
//! `named_modules`/`named_parameters` and listed under both names by `state_dict`, as in PyTorch.
//!
//! Adding children takes `&self` (the builder style `Sequential::new().add(…)` and
//! `push`), since nothing is dropped; removing or replacing one takes `&mut self`. That split
//! is what lets the store lend its children out for as long as the container is borrowed.

use std::ops::{Bound, Index, RangeBounds};
use std::sync::{Arc, RwLock};

use super::{FieldVisitor, Module, ModuleCore, ModuleError, ModuleExt, ModuleFields};
use crate::tensor::{lock_poison, Tensor};

/// Something a container can hold as a child: a module by value, an `Arc<M>`, or an
/// `Arc<dyn Module>` (the way to put one module in several places).
pub trait IntoSharedModule {
    /// The module behind an `Arc`.
    fn into_shared(self) -> Arc<dyn Module>;
}

impl<M: Module> IntoSharedModule for M {
    fn into_shared(self) -> Arc<dyn Module> {
        Arc::new(self)
    }
}

impl<M: Module> IntoSharedModule for Arc<M> {
    fn into_shared(self) -> Arc<dyn Module> {
        self
    }
}

impl IntoSharedModule for Arc<dyn Module> {
    fn into_shared(self) -> Arc<dyn Module> {
        self
    }
}

type Entry = (String, Arc<dyn Module>);

/// The ordered children of a container.
///
/// Invariant: an entry's `Arc` leaves the store only through `&mut self` (see
/// [`entries_mut`](Self::entries_mut)); `&self` methods only add entries or rename them.
/// So while the store is borrowed, every module it held at the start of the borrow stays
/// alive, and [`lend`](Self::lend) can hand out references tied to that borrow.
#[derive(Default)]
struct ChildStore {
    entries: RwLock<Vec<Entry>>,
}

impl ChildStore {
    fn from_entries(entries: Vec<Entry>) -> ChildStore {
        ChildStore { entries: RwLock::new(entries) }
    }

    /// The entries now (the `Arc`s are clones; the lock is not held afterwards).
    fn snapshot(&self) -> Vec<Entry> {
        lock_poison(self.entries.read()).clone()
    }

    fn len(&self) -> usize {
        lock_poison(self.entries.read()).len()
    }

    /// Runs `f` on the list under the write lock. `f` must not drop any entry (see the
    /// invariant); it may add, reorder and rename.
    fn grow<R>(&self, f: impl FnOnce(&mut Vec<Entry>) -> R) -> R {
        let mut e = lock_poison(self.entries.write());
        let before = e.len();
        let r = f(&mut e);
        debug_assert!(e.len() >= before, "ChildStore::grow dropped an entry");
        r
    }

    /// The list, for changes that drop entries.
    fn entries_mut(&mut self) -> &mut Vec<Entry> {
        lock_poison(self.entries.get_mut())
    }

    /// Borrows the module of one of this store's entries for as long as the store is borrowed.
    fn lend<'a>(&'a self, m: &Arc<dyn Module>) -> &'a dyn Module {
        debug_assert!(self.snapshot().iter().any(|(_, e)| Arc::ptr_eq(e, m)), "lend: not an entry of this store");
        // SAFETY: `m` is a clone of one of this store's entries. Entries leave the store only
        // through `&mut self` (the struct invariant), which cannot happen during `'a`, so the
        // store itself keeps an `Arc` to the module alive for all of `'a`. Modules behind an
        // `Arc` are only ever reached through `&`, so no `&mut` aliases this borrow.
        unsafe { &*Arc::as_ptr(m) }
    }

    /// The child at a Python-style index (negative counts from the end).
    fn at(&self, index: isize) -> Option<Entry> {
        let e = lock_poison(self.entries.read());
        py_index(index, e.len()).map(|i| e[i].clone())
    }

    fn visit<'a>(&'a self, v: &mut dyn FieldVisitor<'a>) {
        // The lock is released before the visitor runs, so a visitor may touch the container.
        for (name, m) in self.snapshot() {
            v.module(&name, self.lend(&m));
        }
    }

    /// Removes the child at a Python-style index and renumbers the rest `0`, `1`, ….
    #[track_caller]
    fn remove(&mut self, index: isize) -> Arc<dyn Module> {
        let e = self.entries_mut();
        let i = py_index(index, e.len()).unwrap_or_else(|| out_of_range(index));
        let (_, m) = e.remove(i);
        ChildStore::renumber(e);
        m
    }

    /// Replaces the child at a Python-style index, keeping its name; returns the old one.
    #[track_caller]
    fn replace(&mut self, index: isize, m: Arc<dyn Module>) -> Arc<dyn Module> {
        let e = self.entries_mut();
        let i = py_index(index, e.len()).unwrap_or_else(|| out_of_range(index));
        std::mem::replace(&mut e[i].1, m)
    }

    fn is_positional(entries: &[Entry]) -> bool {
        entries.iter().enumerate().all(|(i, (n, _))| *n == i.to_string())
    }

    fn renumber(entries: &mut [Entry]) {
        for (i, (n, _)) in entries.iter_mut().enumerate() {
            *n = i.to_string();
        }
    }
}

/// `index` (negative counts from the end) as a position in `0..len`.
fn py_index(index: isize, len: usize) -> Option<usize> {
    let i = if index < 0 { index + len as isize } else { index };
    (0..len as isize).contains(&i).then_some(i as usize)
}

/// The insertion point of `list.insert(index, …)` for `-len <= index <= len`.
#[track_caller]
fn insert_index(index: isize, len: usize) -> usize {
    let n = len as isize;
    assert!((-n..=n).contains(&index), "IndexError: Index out of range: {index}");
    if index < 0 {
        (index + n) as usize
    } else {
        index as usize
    }
}

/// Python slice bounds `[start:end]` clamped to `0..len`, as slicing never fails.
fn slice_range(range: impl RangeBounds<isize>, len: usize) -> std::ops::Range<usize> {
    let n = len as isize;
    let abs = |i: isize| if i < 0 { i + n } else { i };
    let clamp = |i: isize| i.clamp(0, n) as usize;
    let start = match range.start_bound() {
        Bound::Included(&s) => clamp(abs(s)),
        Bound::Excluded(&s) => clamp(abs(s).saturating_add(1)),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => clamp(abs(e).saturating_add(1)),
        Bound::Excluded(&e) => clamp(abs(e)),
        Bound::Unbounded => len,
    };
    start..end.max(start)
}

#[track_caller]
fn out_of_range(index: isize) -> ! {
    panic!("IndexError: index {index} is out of range")
}

/// Checks a child name as `add_module` does.
fn check_name(name: &str) -> Result<(), ModuleError> {
    if name.is_empty() {
        return Err(ModuleError("KeyError: module name can't be empty string \"\"".into()));
    }
    if name.contains('.') {
        return Err(ModuleError(format!("KeyError: module name can't contain \".\", got: {name}")));
    }
    Ok(())
}

/// Implements `ModuleFields` for a container: its children are the store's entries.
macro_rules! container_fields {
    ($ty:ident) => {
        impl ModuleFields for $ty {
            fn type_name(&self) -> String {
                stringify!($ty).to_string()
            }
            fn core(&self) -> &ModuleCore {
                &self.core
            }
            fn visit_fields<'a>(&'a self, v: &mut dyn FieldVisitor<'a>) {
                self.children.visit(v);
            }
        }
    };
}

/// The indexed-list API Sequential and ModuleList share over their `children` store:
/// `remove`, `replace`, `len`, `is_empty`, `get`, `iter`, `c[i]` and `for m in &c`.
macro_rules! indexed_children {
    ($ty:ident) => {
        impl $ty {
            /// Removes and returns the child at `index` (`pop`; negative counts from the end),
            /// then renames the remaining children `0`, `1`, … as PyTorch's `del c[i]` does (a
            /// Sequential's named children become positional too).
            ///
            /// # Panics
            /// If `index` is out of range.
            #[track_caller]
            pub fn remove(&mut self, index: isize) -> Arc<dyn Module> {
                self.children.remove(index)
            }

            /// Replaces the child at `index`, keeping its name (`c[i] = m`); returns the old one.
            ///
            /// # Panics
            /// If `index` is out of range.
            #[track_caller]
            pub fn replace(&mut self, index: isize, m: impl IntoSharedModule) -> Arc<dyn Module> {
                self.children.replace(index, m.into_shared())
            }

            /// Number of children.
            pub fn len(&self) -> usize {
                self.children.len()
            }

            /// Whether there are no children.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// The child at `index` (negative counts from the end).
            pub fn get(&self, index: isize) -> Option<Arc<dyn Module>> {
                self.children.at(index).map(|(_, m)| m)
            }

            /// The children in order, each as often as it appears (shared modules repeat).
            pub fn iter(&self) -> std::vec::IntoIter<Arc<dyn Module>> {
                self.children.snapshot().into_iter().map(|(_, m)| m).collect::<Vec<_>>().into_iter()
            }
        }

        impl Index<isize> for $ty {
            type Output = dyn Module;

            /// `c[i]`; negative counts from the end. Panics with PyTorch's `IndexError` when
            /// out of range.
            #[track_caller]
            fn index(&self, index: isize) -> &(dyn Module + 'static) {
                let m = self.get(index).unwrap_or_else(|| out_of_range(index));
                self.children.lend(&m)
            }
        }

        impl IntoIterator for &$ty {
            type Item = Arc<dyn Module>;
            type IntoIter = std::vec::IntoIter<Arc<dyn Module>>;
            fn into_iter(self) -> Self::IntoIter {
                self.iter()
            }
        }
    };
}

/// Modules applied in order (`torch.nn.Sequential`). Children are named `0`, `1`, … or given
/// names ([`from_named`](Self::from_named)); slicing keeps the names.
///
/// ```
/// use tracegrad::nn::{Linear, ModuleExt, ReLU, Sequential};
///
/// let model = Sequential::new().add(Linear::new(784, 256)).add(ReLU::new()).add(Linear::new(256, 10));
/// assert_eq!(model.len(), 3);
/// assert_eq!(model[-1].type_name(), "Linear");
/// assert_eq!(model.slice(1..).named_children()[0].0, "1");
/// ```
#[derive(Default)]
pub struct Sequential {
    children: ChildStore,
    core: ModuleCore,
}

container_fields!(Sequential);
indexed_children!(Sequential);

impl Sequential {
    /// An empty container (its forward returns the input).
    pub fn new() -> Sequential {
        Sequential::default()
    }

    /// A container with named children, in order (`Sequential(OrderedDict(…))`). A repeated
    /// name replaces the earlier module in its place, as a dict would.
    ///
    /// # Panics
    /// If a name is empty or contains `.`.
    #[track_caller]
    pub fn from_named(children: Vec<(String, Arc<dyn Module>)>) -> Sequential {
        let mut entries: Vec<Entry> = Vec::with_capacity(children.len());
        for (name, m) in children {
            check_name(&name).unwrap_or_else(|e| panic!("{e}"));
            match entries.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = m,
                None => entries.push((name, m)),
            }
        }
        Sequential { children: ChildStore::from_entries(entries), core: ModuleCore::new() }
    }

    /// Appends a module (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, m: impl IntoSharedModule) -> Sequential {
        self.push(m);
        self
    }

    /// Appends a (possibly shared) module, named by its position (`append`).
    ///
    /// # Panics
    /// If a named child already has that positional name (PyTorch would silently replace it).
    #[track_caller]
    pub fn push(&self, m: impl IntoSharedModule) {
        let m = m.into_shared();
        self.children.grow(|e| {
            let name = e.len().to_string();
            assert!(
                !e.iter().any(|(n, _)| *n == name),
                "Sequential.append: a child is already named '{name}'; use from_named to rename"
            );
            e.push((name, m));
        });
    }

    /// `append`: the same as [`push`](Self::push), returning `self` for chaining.
    #[track_caller]
    pub fn append(&self, m: impl IntoSharedModule) -> &Sequential {
        self.push(m);
        self
    }

    /// Appends every module of `modules`, each named by its position (`extend`).
    #[track_caller]
    pub fn extend<M: IntoSharedModule>(&self, modules: impl IntoIterator<Item = M>) -> &Sequential {
        for m in modules {
            self.push(m);
        }
        self
    }

    /// Inserts a module before position `index` (`-len <= index <= len`; negative counts from
    /// the end) and renumbers the children `0`, `1`, ….
    ///
    /// # Panics
    /// With PyTorch's `IndexError` when `index` is out of range, and with its `KeyError` when
    /// inserting before the end of a Sequential whose children are not positional.
    #[track_caller]
    pub fn insert(&self, index: isize, m: impl IntoSharedModule) -> &Sequential {
        let m = m.into_shared();
        let at_end = self.children.grow(|e| {
            let i = insert_index(index, e.len());
            if ChildStore::is_positional(e) {
                e.insert(i, (String::new(), m.clone()));
                ChildStore::renumber(e);
                return false;
            }
            assert!(i == e.len(), "KeyError: '{}' (Sequential.insert renumbers positional children)", e.len() - 1);
            true
        });
        if at_end {
            self.push(m);
        }
        self
    }

    /// A new Sequential holding the same child modules (the same `Arc`s) at `range`, under
    /// their original names (`seq[1:]`). Bounds follow Python: negative counts from the end,
    /// out-of-range bounds clamp.
    pub fn slice(&self, range: impl RangeBounds<isize>) -> Sequential {
        let e = self.children.snapshot();
        let r = slice_range(range, e.len());
        Sequential { children: ChildStore::from_entries(e[r].to_vec()), core: ModuleCore::new() }
    }

    /// The children's names in order (duplicates of a shared module included).
    pub fn names(&self) -> Vec<String> {
        self.children.snapshot().into_iter().map(|(n, _)| n).collect()
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.clone();
        for m in self.iter() {
            h = m.call(&h);
        }
        h
    }
}

/// A list of modules (`torch.nn.ModuleList`): registered children named `0`, `1`, …, with
/// indexing and iteration but no forward of its own.
///
/// ```
/// use tracegrad::nn::{Linear, ModuleExt, ModuleList};
///
/// let layers: ModuleList = (0..3).map(|_| Linear::new(4, 4)).collect();
/// let x = tracegrad::Tensor::randn(&[2, 4]);
/// let y = layers.iter().fold(x, |h, l| l.call(&h));
/// assert_eq!(y.shape(), vec![2, 4]);
/// assert_eq!(layers.named_parameters().len(), 6);
/// ```
#[derive(Default)]
pub struct ModuleList {
    children: ChildStore,
    core: ModuleCore,
}

container_fields!(ModuleList);
indexed_children!(ModuleList);

impl ModuleList {
    /// An empty list.
    pub fn new() -> ModuleList {
        ModuleList::default()
    }

    /// Appends a module (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, m: impl IntoSharedModule) -> ModuleList {
        self.append(m);
        self
    }

    /// Appends a (possibly shared) module under the next index.
    pub fn append(&self, m: impl IntoSharedModule) -> &ModuleList {
        let m = m.into_shared();
        self.children.grow(|e| e.push((e.len().to_string(), m)));
        self
    }

    /// Appends every module of `modules`.
    pub fn extend<M: IntoSharedModule>(&self, modules: impl IntoIterator<Item = M>) -> &ModuleList {
        for m in modules {
            self.append(m);
        }
        self
    }

    /// Inserts a module before position `index` (`-len <= index <= len`; negative counts
    /// from the end); later children move up one index.
    ///
    /// # Panics
    /// With PyTorch's `IndexError` when `index` is out of range.
    #[track_caller]
    pub fn insert(&self, index: isize, m: impl IntoSharedModule) -> &ModuleList {
        let m = m.into_shared();
        self.children.grow(|e| {
            let i = insert_index(index, e.len());
            e.insert(i, (String::new(), m));
            ChildStore::renumber(e);
        });
        self
    }

    /// A new ModuleList of the same modules at `range`, renumbered from `0` (`list[1:]`).
    pub fn slice(&self, range: impl RangeBounds<isize>) -> ModuleList {
        let e = self.children.snapshot();
        let r = slice_range(range, e.len());
        e[r].iter().map(|(_, m)| m.clone()).collect()
    }
}

impl<M: IntoSharedModule> FromIterator<M> for ModuleList {
    fn from_iter<I: IntoIterator<Item = M>>(iter: I) -> ModuleList {
        let list = ModuleList::new();
        list.extend(iter);
        list
    }
}

impl Module for ModuleList {
    /// A ModuleList only holds modules; calling it is an error, as in PyTorch.
    #[track_caller]
    fn forward_many(&self, _xs: &[Tensor]) -> Tensor {
        panic!(
            "NotImplementedError: Module [ModuleList] is missing the required \"forward\" function \
             (ModuleList has no forward; index it)"
        )
    }
}

/// Modules by name, in insertion order (`torch.nn.ModuleDict`).
///
/// ```
/// use tracegrad::nn::{Linear, ModuleDict, ModuleExt, ReLU};
///
/// let mut heads = ModuleDict::new().add("cls", Linear::new(8, 10)).add("act", ReLU::new());
/// assert_eq!(heads.keys(), ["cls", "act"]);
/// heads.remove("act");
/// assert_eq!(heads["cls"].type_name(), "Linear");
/// ```
#[derive(Default)]
pub struct ModuleDict {
    children: ChildStore,
    core: ModuleCore,
}

container_fields!(ModuleDict);

impl ModuleDict {
    /// An empty dict.
    pub fn new() -> ModuleDict {
        ModuleDict::default()
    }

    /// Adds a module under `key` (builder style).
    ///
    /// # Panics
    /// If `key` is empty or contains `.`.
    #[allow(clippy::should_implement_trait)]
    #[track_caller]
    pub fn add(mut self, key: &str, m: impl IntoSharedModule) -> ModuleDict {
        self.insert(key, m).unwrap_or_else(|e| panic!("{e}"));
        self
    }

    /// `dict[key] = m`: a new key goes at the end; an existing key keeps its place and its
    /// old module is returned.
    pub fn insert(&mut self, key: &str, m: impl IntoSharedModule) -> Result<Option<Arc<dyn Module>>, ModuleError> {
        check_name(key)?;
        let m = m.into_shared();
        let e = self.children.entries_mut();
        Ok(match e.iter_mut().find(|(n, _)| n == key) {
            Some(slot) => Some(std::mem::replace(&mut slot.1, m)),
            None => {
                e.push((key.to_string(), m));
                None
            }
        })
    }

    /// Removes `key` and returns its module (`pop`).
    pub fn remove(&mut self, key: &str) -> Option<Arc<dyn Module>> {
        let e = self.children.entries_mut();
        let i = e.iter().position(|(n, _)| n == key)?;
        Some(e.remove(i).1)
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.children.entries_mut().clear();
    }

    /// The module under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<dyn Module>> {
        self.children.snapshot().into_iter().find(|(n, _)| n == key).map(|(_, m)| m)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The keys in insertion order.
    pub fn keys(&self) -> Vec<String> {
        self.children.snapshot().into_iter().map(|(n, _)| n).collect()
    }

    /// The modules in insertion order.
    pub fn values(&self) -> Vec<Arc<dyn Module>> {
        self.children.snapshot().into_iter().map(|(_, m)| m).collect()
    }

    /// `(key, module)` pairs in insertion order.
    pub fn items(&self) -> Vec<(String, Arc<dyn Module>)> {
        self.children.snapshot()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether the dict is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: AsRef<str>, M: IntoSharedModule> FromIterator<(K, M)> for ModuleDict {
    /// Builds a dict from pairs; see [`ModuleDict::add`] for the panics.
    #[track_caller]
    fn from_iter<I: IntoIterator<Item = (K, M)>>(iter: I) -> ModuleDict {
        iter.into_iter().fold(ModuleDict::new(), |d, (k, m)| d.add(k.as_ref(), m))
    }
}

impl Index<&str> for ModuleDict {
    type Output = dyn Module;

    /// `dict[key]`; panics with PyTorch's `KeyError` when absent.
    #[track_caller]
    fn index(&self, key: &str) -> &(dyn Module + 'static) {
        let m = self.get(key).unwrap_or_else(|| panic!("KeyError: '{key}'"));
        self.children.lend(&m)
    }
}

impl Module for ModuleDict {
    /// A ModuleDict only holds modules; calling it is an error, as in PyTorch.
    #[track_caller]
    fn forward_many(&self, _xs: &[Tensor]) -> Tensor {
        panic!(
            "NotImplementedError: Module [ModuleDict] is missing the required \"forward\" function \
             (ModuleDict has no forward; look a module up by key)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // Python slices: `[2:1]` is empty, `[0:]` via `..=-1`.
    fn python_slices() {
        assert_eq!(slice_range(1.., 3), 1..3);
        assert_eq!(slice_range(..-1, 3), 0..2);
        assert_eq!(slice_range(-2.., 3), 1..3);
        assert_eq!(slice_range(5.., 3), 3..3);
        assert_eq!(slice_range(-10..2, 3), 0..2);
        assert_eq!(slice_range(2..1, 3), 2..2);
        assert_eq!(slice_range(0..=-1, 3), 0..3);
        assert_eq!(slice_range(0..=1, 3), 0..2);
    }

    #[test]
    fn python_indices() {
        assert_eq!(py_index(-1, 3), Some(2));
        assert_eq!(py_index(-3, 3), Some(0));
        assert_eq!(py_index(-4, 3), None);
        assert_eq!(py_index(3, 3), None);
        assert_eq!(insert_index(-1, 3), 2);
        assert_eq!(insert_index(3, 3), 3);
    }
}
