//! Walking a list endpoint page by page.

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::Instrument;
use url::Url;

use super::pagination::{Cursor, NextPage, Style, next_page};
use super::shape;
use crate::batch::join_failure;
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
    /// Where a page says how many ids the whole list has, if it does.
    pub(crate) total_at: Option<String>,
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
    /// How many pages in a row repeated the one before.
    repeats: u32,
    /// A failure found with the last page, reported after its ids.
    pending: Option<Error>,
    /// Where the list's total goes when a page gives it (the batch's progress).
    total: Option<Arc<OnceLock<u64>>>,
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
            repeats: 0,
            pending: None,
            total: None,
            _ids: PhantomData,
        })
    }

    /// Reports the list's total there when a page gives it (see `total_at`), unless
    /// repeats are dropped, which would make it wrong.
    fn reporting_total(mut self, total: Arc<OnceLock<u64>>) -> Self {
        if !self.shared.dedup_ids {
            self.total = Some(total);
        }
        self
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
        if !self.fetched.insert(url.as_str().to_owned()) {
            return Some(Err(pagination_error(
                url,
                "pagination loop: this page was fetched before".to_owned(),
            )));
        }
        let cursor = &mut self.cursor;
        let total = self.total.as_deref();
        let read = |answer: Answer| {
            let body: Value = serde_json::from_slice(answer.body()).map_err(|err| {
                answer.unusable(
                    ErrorKind::Decode,
                    format!("the list page is not JSON: {err}"),
                )
            })?;
            if let (Some(total), Some(at)) = (total, &list.total_at)
                && let Some(count) = body.pointer(at).and_then(Value::as_u64)
            {
                let _ = total.set(count);
            }
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

        if ids.is_empty() {
            // The empty page that ends a counted list is not a page of the list.
            return Some(Ok(ids));
        }
        self.pages += 1;
        if self.pages > list.max_pages {
            return Some(Err(pagination_error(
                page_url,
                format!(
                    "the list has more than max_pages ({}) pages; raise max_pages to fetch more",
                    list.max_pages
                ),
            )));
        }
        // A server that ignores the page or offset parameter answers the same page
        // under ever new URLs. One repeat can be real (rows inserted while paging);
        // three identical pages in a row are a loop.
        if matches!(
            list.pagination,
            Style::OffsetLimit { .. } | Style::PageNumber { .. }
        ) {
            self.repeats = match self.last_page {
                Some(last) if last == fingerprint => self.repeats + 1,
                _ => 0,
            };
            if self.repeats >= 2 {
                return Some(Err(pagination_error(
                    page_url,
                    "pagination loop: three pages in a row list the same ids \
                     (is the page parameter ignored?)"
                        .to_owned(),
                )));
            }
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

/// The listed ids as a batch's source. Each page is fetched in a task of its own when
/// the batch wants more ids, so that once started it runs to the end (and its timeout
/// is its own) whether or not the batch's consumer is polling at the time.
///
/// When a page says how many ids the list has (`total_at`), the count goes to `total`.
pub(crate) fn listed_ids<Id>(
    shared: Arc<Shared>,
    total: Arc<OnceLock<u64>>,
) -> BoxStream<'static, Result<Id, Error>>
where
    Id: DeserializeOwned + Send + 'static,
{
    let lister = match Lister::<Id>::new(shared) {
        Ok(lister) => lister.reporting_total(total),
        Err(err) => return stream::iter([Err(err)]).boxed(),
    };
    stream::unfold(Some(lister), |lister| async move {
        let mut lister = lister?;
        let Ok(runtime) = Handle::try_current() else {
            let err = Error::new(
                ErrorKind::Runtime,
                "fanout's batches must be polled inside a Tokio runtime",
            );
            return Some((vec![Err(err)], None));
        };
        // In the batch's span, like its ids.
        let page = async move {
            let page = lister.next_page().await;
            (lister, page)
        };
        let task = AbortOnDrop(runtime.spawn(page.in_current_span()));
        match task.await {
            Ok((lister, Some(Ok(ids)))) => Some((ids.into_iter().map(Ok).collect(), Some(lister))),
            Ok((_, Some(Err(err)))) => Some((vec![Err(err)], None)),
            Ok((_, None)) => None,
            Err(err) => Some((vec![Err(join_failure(err))], None)),
        }
    })
    .flat_map(stream::iter)
    .boxed()
}

/// A task that is cancelled when whoever waits for it goes away.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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
