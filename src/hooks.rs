//! Hook registration handles.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Returned by every hook registration; [`remove`](Self::remove) unregisters the hook.
/// Removing twice is harmless. Dropping the handle does not remove the hook (as in PyTorch).
pub struct RemovableHandle {
    remove: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl RemovableHandle {
    pub(crate) fn new(remove: impl FnOnce() + Send + 'static) -> RemovableHandle {
        RemovableHandle { remove: Mutex::new(Some(Box::new(remove))) }
    }

    /// A handle whose removal sets the returned flag: for a hook that lives in a compiled
    /// plan, which checks the flag at run time and is rebuilt once it is set.
    pub(crate) fn with_flag() -> (RemovableHandle, Arc<AtomicBool>) {
        let removed = Arc::new(AtomicBool::new(false));
        let flag = removed.clone();
        (RemovableHandle::new(move || flag.store(true, Ordering::Release)), removed)
    }

    /// Unregisters the hook; later calls do nothing.
    pub fn remove(&self) {
        let f = self.remove.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}
