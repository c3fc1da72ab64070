//! Turning a caught panic back into text, for errors that report a panicking hook or forward.

use std::any::Any;

/// The message a panic was raised with (`panic!("...")` carries a `&str` or a `String`), or
/// `None` for any other payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}
