//! Where each id's record is: a URL template, or a function of the id.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;

use reqwest::header::HeaderMap;
use url::Url;

use crate::error::{Error, ErrorKind};
use crate::template::UrlTemplate;

/// A caller's function from an id to its URL, as `FanOutBuilder::detail_url_with`
/// keeps it.
pub(crate) type UrlFn<Id> = Box<dyn Fn(&Id) -> Result<Url, String> + Send + Sync>;

/// Where each id's record is.
pub(crate) enum DetailUrl {
    Template(UrlTemplate),
    Function {
        /// A `UrlFn<Id>`, behind `Any` because `Shared` has no `Id` parameter; the
        /// engine, which has, takes it back out.
        make: ErasedUrlFn,
        /// `FanOutBuilder::query` pairs, appended to every URL.
        query: Vec<(String, String)>,
    },
}

/// A `UrlFn<Id>` behind `Any`, for a `DetailUrl::Function`.
pub(crate) type ErasedUrlFn = Box<dyn Any + Send + Sync>;

pub(crate) fn erase<Id: 'static>(make: UrlFn<Id>) -> ErasedUrlFn {
    Box::new(make)
}

/// A caller's function that makes each id's request, as `FanOutBuilder::request_with`
/// keeps it.
pub(crate) type RequestFn<Id> =
    Box<dyn Fn(&reqwest::Client, &Id, Url) -> reqwest::RequestBuilder + Send + Sync>;

/// A `RequestFn<Id>` behind `Any`, because `Shared` has no `Id` parameter.
pub(crate) struct ErasedRequestFn(Box<dyn Any + Send + Sync>);

impl ErasedRequestFn {
    pub(crate) fn new<Id: 'static>(make: RequestFn<Id>) -> Self {
        ErasedRequestFn(Box::new(make))
    }

    /// The request the caller's function makes for `id`, whose URL is `url`, built and
    /// checked: an http(s) URL with a host and no credentials. The `FanOut`'s headers
    /// are added where the function set none of the same name; a panic in the function
    /// fails that id alone.
    pub(crate) fn make<Id: 'static>(
        &self,
        client: &reqwest::Client,
        headers: &HeaderMap,
        id: &Id,
        url: Url,
    ) -> Result<reqwest::Request, Error> {
        let Some(make) = self.0.downcast_ref::<RequestFn<Id>>() else {
            return Err(Error::new(
                ErrorKind::Runtime,
                "the request function was made for another id type",
            ));
        };
        let made = std::panic::catch_unwind(AssertUnwindSafe(|| make(client, id, url)));
        let Ok(builder) = made else {
            return Err(Error::new(
                ErrorKind::Panic,
                "the request function panicked for this id",
            ));
        };
        let mut request = builder.build().map_err(|err| {
            let message = format!("the request function's request could not be built: {err}");
            Error::new(ErrorKind::InvalidId, message).with_source(err)
        })?;
        check(request.url(), "the request function")?;
        for name in headers.keys() {
            if !request.headers().contains_key(name) {
                for value in headers.get_all(name) {
                    request.headers_mut().append(name, value.clone());
                }
            }
        }
        Ok(request)
    }
}

impl fmt::Debug for ErasedRequestFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<function>")
    }
}

impl DetailUrl {
    /// The template's origin, which every id's URL has; `None` for a function.
    pub(crate) fn origin(&self) -> Option<&Url> {
        match self {
            DetailUrl::Template(template) => Some(template.origin()),
            DetailUrl::Function { .. } => None,
        }
    }

    /// `id`'s URL. `id_text` is its `Display` form; `buf` is scratch space.
    pub(crate) fn url<Id: 'static>(
        &self,
        id: &Id,
        id_text: &str,
        buf: &mut String,
    ) -> Result<Url, Error> {
        match self {
            DetailUrl::Template(template) => template.render(id_text, buf),
            DetailUrl::Function { make, query } => {
                let Some(make) = make.downcast_ref::<UrlFn<Id>>() else {
                    return Err(Error::new(
                        ErrorKind::Runtime,
                        "the URL function was made for another id type",
                    ));
                };
                from_function(make, id, query)
            }
        }
    }
}

/// Calls the caller's function and checks what it gave: an http(s) URL with a host
/// and no credentials. A panic in the function fails that id alone.
fn from_function<Id>(make: &UrlFn<Id>, id: &Id, query: &[(String, String)]) -> Result<Url, Error> {
    let made = std::panic::catch_unwind(AssertUnwindSafe(|| make(id)));
    let refused = |message: String| Error::new(ErrorKind::InvalidId, message);
    let mut url = match made {
        Ok(Ok(url)) => url,
        Ok(Err(reason)) => return Err(refused(format!("the URL function refused it: {reason}"))),
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Panic,
                "the URL function panicked for this id",
            ));
        }
    };
    check(&url, "the URL function")?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

/// Refuses a URL that a caller's function (`who`) gave, unless it is http(s) with a
/// host and carries no credentials.
fn check(url: &Url, who: &str) -> Result<(), Error> {
    let refused = |message: String| Error::new(ErrorKind::InvalidId, message);
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(refused(format!(
            "{who} gave a URL that is not http(s) with a host (scheme `{}`)",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // They would be sent as Basic auth, and shown in errors: use headers instead.
        return Err(refused(format!(
            "{who} gave a URL with a user name or password; set credentials with \
             bearer_auth or header instead"
        )));
    }
    Ok(())
}

impl fmt::Debug for DetailUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetailUrl::Template(template) => fmt::Debug::fmt(template, f),
            DetailUrl::Function { .. } => f.write_str("<function>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(make: impl Fn(&u32) -> Result<Url, String> + Send + Sync + 'static) -> DetailUrl {
        DetailUrl::Function {
            make: erase::<u32>(Box::new(make)),
            query: vec![("key".into(), "k 1".into())],
        }
    }

    fn url_of(detail: &DetailUrl, id: u32) -> Result<Url, Error> {
        detail.url(&id, &id.to_string(), &mut String::new())
    }

    #[test]
    fn a_function_maps_ids_to_hosts_with_the_query_appended() {
        let shards = detail(|id| {
            Url::parse(&format!("http://shard{}.example/items/{id}", id % 3))
                .map_err(|e| e.to_string())
        });
        assert_eq!(
            url_of(&shards, 7).unwrap().as_str(),
            "http://shard1.example/items/7?key=k+1"
        );
    }

    #[test]
    fn what_a_function_gives_is_checked() {
        type Make = fn(&u32) -> Result<Url, String>;
        let cases: [(Make, ErrorKind, &str); 4] = [
            (
                |_| Err("no shard".into()),
                ErrorKind::InvalidId,
                "refused it: no shard",
            ),
            (
                |_| Ok(Url::parse("ftp://h/x").unwrap()),
                ErrorKind::InvalidId,
                "`ftp`",
            ),
            (
                |_| Ok(Url::parse("http://u:secret@h/x").unwrap()),
                ErrorKind::InvalidId,
                "user name or password",
            ),
            (|_| panic!("boom"), ErrorKind::Panic, "panicked"),
        ];
        for (make, kind, text) in cases {
            let err = url_of(&detail(make), 1).unwrap_err();
            assert_eq!(err.kind(), kind);
            assert!(err.to_string().contains(text), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn a_function_for_another_id_type_is_an_error_not_a_panic() {
        let detail = detail(|_| Ok(Url::parse("http://h/").unwrap()));
        let err = detail.url(&"x", "x", &mut String::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Runtime);
    }
}
