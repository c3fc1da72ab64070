//! Hook registration handles.

use std::sync::Mutex;

/// Returned by every hook registration; [`remove`](Self::remove) unregisters the hook.
/// Removing twice is harmless. Dropping the handle does not remove the hook (as in PyTorch).
pub struct RemovableHandle {
    remove: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl RemovableHandle {
    pub(crate) fn new(remove: impl FnOnce() + Send + 'static) -> RemovableHandle {
        RemovableHandle { remove: Mutex::new(Some(Box::new(remove))) }
    }

    /// Unregisters the hook; later calls do nothing.
    pub fn remove(&self) {
        let f = self.remove.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }
}
