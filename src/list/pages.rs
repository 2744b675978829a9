//! Walking a list endpoint page by page.

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use super::pagination::{Cursor, NextPage, Style, next_page};
use super::shape;
use crate::error::{Error, ErrorKind};
use crate::fanout::Shared;
use crate::request::Answer;
use crate::retry::fetch_with;

/// The list endpoint's settings, checked by `build()`.
#[derive(Debug)]
pub(crate) struct ListSettings {
    pub(crate) url: Url,
    pub(crate) ids_at: String,
    pub(crate) id_field: String,
    pub(crate) pagination: Style,
    pub(crate) max_pages: usize,
}

/// Fetches one page at a time, on request.
pub(crate) struct Lister<Id> {
    shared: Arc<Shared>,
    cursor: Cursor,
    pages: usize,
    /// Every page URL fetched, to catch a next link that leads back.
    fetched: HashSet<String>,
    /// A fingerprint of the last page's ids, to catch a server ignoring the page
    /// parameter.
    last_page: Option<u64>,
    /// A failure found with the last page, reported after its ids.
    pending: Option<Error>,
    _ids: PhantomData<fn() -> Id>,
}

impl<Id: DeserializeOwned> Lister<Id> {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, Error> {
        let Some(list) = &shared.list else {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "no list URL; call .list_url(\"https://api.example.com/items\") on the builder",
            ));
        };
        let cursor = Cursor::start(&list.url, &list.pagination);
        Ok(Lister {
            shared,
            cursor,
            pages: 0,
            fetched: HashSet::new(),
            last_page: None,
            pending: None,
            _ids: PhantomData,
        })
    }

    /// The next page's ids; `None` after the last page (or after an error).
    pub(crate) async fn next_page(&mut self) -> Option<Result<Vec<Id>, Error>> {
        if let Some(err) = self.pending.take() {
            return Some(Err(err));
        }
        let url = self.cursor.next.take()?;
        let Some(list) = &self.shared.list else {
            return None;
        };
        if self.pages >= list.max_pages {
            return Some(Err(pagination_error(
                url,
                format!(
                    "the list has more than max_pages ({}) pages; raise max_pages to fetch more",
                    list.max_pages
                ),
            )));
        }
        if !self.fetched.insert(url.as_str().to_owned()) {
            return Some(Err(pagination_error(
                url,
                "pagination loop: this page was fetched before".to_owned(),
            )));
        }
        self.pages += 1;

        let cursor = &mut self.cursor;
        let read = |answer: Answer| {
            let body: Value = serde_json::from_slice(answer.body()).map_err(|err| {
                answer.unusable(
                    ErrorKind::Decode,
                    format!("the list page is not JSON: {err}"),
                )
            })?;
            let (ids, items) = shape::ids::<Id>(&body, &list.ids_at, &list.id_field)
                .map_err(|message| answer.unusable(ErrorKind::Decode, message))?;
            let fingerprint = fingerprint(items);
            let next = next_page(
                &list.pagination,
                cursor,
                answer.url(),
                answer.headers(),
                &body,
                ids.len(),
            );
            Ok((ids, fingerprint, next, answer.url().clone()))
        };
        let (ids, fingerprint, next, page_url) = match fetch_with(&self.shared, url, read).await {
            Ok(page) => page,
            Err(err) => return Some(Err(err)),
        };

        if !ids.is_empty() && self.last_page == Some(fingerprint) {
            return Some(Err(pagination_error(
                page_url,
                "pagination loop: this page lists the same ids as the page before \
                 (is the page parameter ignored?)"
                    .to_owned(),
            )));
        }
        self.last_page = Some(fingerprint);
        match next {
            NextPage::Last => {}
            // Every page is sent the configured headers, credentials included: a next
            // link must not take them to another server.
            NextPage::At(url) if url.origin() != list.url.origin() => {
                self.pending = Some(pagination_error(
                    page_url,
                    format!(
                        "the next page, {url}, is not on the list URL's origin ({}); it is \
                         not followed, since the request headers may hold credentials",
                        list.url.origin().ascii_serialization()
                    ),
                ));
            }
            NextPage::At(url) => self.cursor.next = Some(url),
            NextPage::Unusable(message) => {
                self.pending = Some(pagination_error(page_url, message));
            }
        }
        Some(Ok(ids))
    }
}

fn pagination_error(url: Url, message: String) -> Error {
    Error::new(ErrorKind::Pagination, message).with_url(url)
}

/// A hash of a page's items, to tell whether two pages list the same ids.
fn fingerprint(items: &[Value]) -> u64 {
    // A fixed-key hasher: the same page must give the same value within one listing.
    let mut hasher = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
    for item in items {
        item.to_string().hash(&mut hasher);
    }
    hasher.finish()
}
