//! Eager reference kernels. They take contiguous row-major slices or [`Buffer`](crate::Buffer)s
//! whose shapes the op's shape rule has already validated, and return fresh storage.
//! Data-dependent failures (an index out of range) come back as `Err(String)` in PyTorch's words.

pub mod conv;
pub mod index;
pub mod layout;
pub mod linalg;
pub mod matmul;
pub mod pointwise;
pub mod reduce;
pub mod scatter;
pub mod softmax;
