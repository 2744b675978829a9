//! Where ids come from: a list endpoint, its page shapes and its pagination.

mod pages;
mod pagination;
mod shape;

pub use self::pagination::Pagination;

pub(crate) use self::pages::{ListSettings, Lister, listed_ids};
