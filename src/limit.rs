//! How many requests go at once and when: the concurrency limit (fixed or adaptive),
//! and pauses the server asks for.

mod adaptive;
mod concurrency;
mod hosts;
mod pause;

pub use self::concurrency::Concurrency;

pub(crate) use self::concurrency::{Signal, Slot, Slots};
pub(crate) use self::hosts::{Host, Hosts};
pub(crate) use self::pause::{Pause, Turn};
