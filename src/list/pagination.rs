//! `Pagination`: how a list endpoint says where its next page is.

use reqwest::header::{HeaderMap, LINK};
use serde_json::Value;
use url::Url;

/// How the list endpoint ([`FanOutBuilder::list_url`](crate::FanOutBuilder::list_url))
/// spreads its ids over pages, and so how the next page is found.
///
/// Listing stops at an empty page, or when the server gives no next page. Every style
/// is guarded against loops: a next-page URL that was already fetched, or a page that
/// lists exactly the ids of the page before (a server ignoring the page parameter),
/// is an [`ErrorKind::Pagination`](crate::ErrorKind::Pagination) error; so is a list
/// longer than [`max_pages`](crate::FanOutBuilder::max_pages).
///
/// ```
/// use fanout::Pagination;
///
/// // GitHub style: `Link: <https://api.example.com/items?page=2>; rel="next"`.
/// let github = Pagination::link_header();
/// // `{"data": [...], "links": {"next": "/items?page=2"}}`
/// let in_body = Pagination::next_url_at("/links/next");
/// // `?offset=0&limit=100`, then `?offset=100&limit=100`, ...
/// let offsets = Pagination::offset_limit("offset", "limit", 100);
/// // `?page=1`, `?page=2`, ...
/// let pages = Pagination::page_number("page");
/// // `{"items": [...], "next_cursor": "abc"}`, then `?cursor=abc`
/// let cursor = Pagination::cursor("/next_cursor", "cursor");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Pagination {
    pub(crate) style: Style,
}

#[derive(Debug, Clone, Default)]
pub(crate) enum Style {
    #[default]
    None,
    LinkHeader,
    NextUrlAt(String),
    OffsetLimit {
        offset: String,
        limit: String,
        page_size: u64,
    },
    PageNumber {
        param: String,
        first: u64,
    },
    Cursor {
        at: String,
        param: String,
    },
}

impl Pagination {
    /// One page: the list URL's answer is the whole list. The default.
    pub fn none() -> Self {
        Pagination { style: Style::None }
    }

    /// The next page's URL is the `Link` response header's `rel="next"` target
    /// (RFC 8288), as GitHub's and many other APIs send it.
    pub fn link_header() -> Self {
        Pagination {
            style: Style::LinkHeader,
        }
    }

    /// The next page's URL is the string at this JSON pointer in the body (e.g.
    /// `/links/next` or `/next`). A relative URL is resolved against the page's own
    /// URL; `null`, `""` or no value there means this was the last page.
    pub fn next_url_at(pointer: impl Into<String>) -> Self {
        Pagination {
            style: Style::NextUrlAt(pointer.into()),
        }
    }

    /// Pages are chosen by query parameters `offset_param=0&limit_param=page_size`,
    /// then `offset_param` advanced by the number of ids each page held (so a server
    /// that returns fewer than asked still loses nothing). Stops at an empty page.
    pub fn offset_limit(
        offset_param: impl Into<String>,
        limit_param: impl Into<String>,
        page_size: u64,
    ) -> Self {
        Pagination {
            style: Style::OffsetLimit {
                offset: offset_param.into(),
                limit: limit_param.into(),
                page_size,
            },
        }
    }

    /// Pages are chosen by a page-number query parameter, `param=1`, `param=2`, ...
    /// Stops at an empty page. See [`first_page`](Self::first_page) for APIs that
    /// count from 0.
    pub fn page_number(param: impl Into<String>) -> Self {
        Pagination {
            style: Style::PageNumber {
                param: param.into(),
                first: 1,
            },
        }
    }

    /// The number of the first page, for [`page_number`](Self::page_number)
    /// pagination; ignored by the other styles.
    ///
    /// Default: 1.
    pub fn first_page(mut self, number: u64) -> Self {
        if let Style::PageNumber { first, .. } = &mut self.style {
            *first = number;
        }
        self
    }

    /// Each page's body holds an opaque cursor at this JSON pointer (a string or a
    /// number), sent back as the query parameter `param` to get the next page.
    /// `null`, `""` or no value there means this was the last page.
    pub fn cursor(pointer: impl Into<String>, param: impl Into<String>) -> Self {
        Pagination {
            style: Style::Cursor {
                at: pointer.into(),
                param: param.into(),
            },
        }
    }

    /// What is wrong with these settings, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        let pointer_problem = |pointer: &str| {
            (!pointer.is_empty() && !pointer.starts_with('/')).then(|| {
                format!("the pagination pointer {pointer:?} must be empty or start with `/`")
            })
        };
        match &self.style {
            Style::None | Style::LinkHeader => None,
            Style::NextUrlAt(at) => pointer_problem(at),
            Style::Cursor { at, param } if param.is_empty() => {
                pointer_problem(at).or(Some("the cursor parameter name is empty".to_owned()))
            }
            Style::Cursor { at, .. } => pointer_problem(at),
            Style::OffsetLimit { page_size: 0, .. } => {
                Some("the offset/limit page size must be at least 1".to_owned())
            }
            Style::OffsetLimit { offset, limit, .. } if offset.is_empty() || limit.is_empty() => {
                Some("the offset/limit parameter names must not be empty".to_owned())
            }
            Style::PageNumber { param, .. } if param.is_empty() => {
                Some("the page-number parameter name is empty".to_owned())
            }
            Style::OffsetLimit { .. } | Style::PageNumber { .. } => None,
        }
    }
}

/// Where the listing is between pages.
pub(crate) struct Cursor {
    /// The next page's URL; `None` once the last page was fetched.
    pub(crate) next: Option<Url>,
    /// Offset or page number of the next page, for the counting styles.
    position: u64,
}

impl Cursor {
    /// The first page: the list URL, with the counting styles' parameters set.
    pub(crate) fn start(list_url: &Url, style: &Style) -> Self {
        let (next, position) = match style {
            Style::OffsetLimit {
                offset,
                limit,
                page_size,
            } => {
                let url = with_param(list_url, offset, "0");
                (with_param(&url, limit, &page_size.to_string()), 0)
            }
            Style::PageNumber { param, first } => {
                (with_param(list_url, param, &first.to_string()), *first)
            }
            _ => (list_url.clone(), 0),
        };
        Cursor {
            next: Some(next),
            position,
        }
    }
}

/// What a page says about the next one.
pub(crate) enum NextPage {
    Last,
    At(Url),
    /// The page says something that cannot be followed.
    Unusable(String),
}

/// Finds the next page from the page just read: its URL (after redirects), headers,
/// body, and how many ids it held.
pub(crate) fn next_page(
    style: &Style,
    cursor: &mut Cursor,
    page_url: &Url,
    headers: &HeaderMap,
    body: &Value,
    ids_on_page: usize,
) -> NextPage {
    if ids_on_page == 0 {
        return NextPage::Last;
    }
    match style {
        Style::None => NextPage::Last,
        Style::LinkHeader => match next_link(headers) {
            LinkNext::None => NextPage::Last,
            LinkNext::Unreadable(message) => NextPage::Unusable(message),
            LinkNext::At(target) => match page_url.join(&target) {
                Ok(url) => NextPage::At(url),
                Err(err) => NextPage::Unusable(format!(
                    "the Link header's next target {:?} is not a URL ({err})",
                    shorten(&target)
                )),
            },
        },
        Style::NextUrlAt(at) => match body.pointer(at) {
            None | Some(Value::Null) => NextPage::Last,
            Some(Value::String(target)) if target.is_empty() => NextPage::Last,
            Some(Value::String(target)) => match page_url.join(target) {
                Ok(url) => NextPage::At(url),
                Err(err) => NextPage::Unusable(format!(
                    "the next-page link at {at:?} is not a URL: {:?} ({err})",
                    shorten(target)
                )),
            },
            Some(other) => NextPage::Unusable(format!(
                "expected a next-page URL (a string) at {at:?}, found {}",
                describe(other)
            )),
        },
        Style::Cursor { at, param } => {
            let text = match body.pointer(at) {
                None | Some(Value::Null) => return NextPage::Last,
                Some(Value::String(text)) if text.is_empty() => return NextPage::Last,
                Some(Value::String(text)) => text.clone(),
                Some(Value::Number(number)) => number.to_string(),
                Some(other) => {
                    return NextPage::Unusable(format!(
                        "expected a cursor (a string or a number) at {at:?}, found {}",
                        describe(other)
                    ));
                }
            };
            NextPage::At(with_param(page_url, param, &text))
        }
        Style::OffsetLimit { offset, .. } => {
            cursor.position = cursor.position.saturating_add(ids_on_page as u64);
            NextPage::At(with_param(page_url, offset, &cursor.position.to_string()))
        }
        Style::PageNumber { param, .. } => {
            cursor.position = cursor.position.saturating_add(1);
            NextPage::At(with_param(page_url, param, &cursor.position.to_string()))
        }
    }
}

/// `url` with the query parameter `name` set to `value`: any `name=` already there is
/// removed, and every other parameter is kept byte for byte, in its place (signed
/// URLs and servers that read `+` literally depend on that).
fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let mut query = String::new();
    for pair in url.query().unwrap_or_default().split('&') {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        let decoded = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
        if pair.is_empty() || decoded == name {
            continue;
        }
        query.push_str(pair);
        query.push('&');
    }
    let encode = |text| url::form_urlencoded::byte_serialize(text).collect::<String>();
    query.push_str(&encode(name.as_bytes()));
    query.push('=');
    query.push_str(&encode(value.as_bytes()));
    let mut url = url.clone();
    url.set_query(Some(&query));
    url
}

/// What the `Link` headers say about the next page (RFC 8288).
pub(crate) enum LinkNext {
    None,
    At(String),
    /// A `Link` header that cannot be read: better an error than a silently short list.
    Unreadable(String),
}

/// The target of the first `rel="next"` link in the `Link` headers.
pub(crate) fn next_link(headers: &HeaderMap) -> LinkNext {
    for value in headers.get_all(LINK) {
        let Ok(text) = std::str::from_utf8(value.as_bytes()) else {
            return LinkNext::Unreadable("a Link header is not UTF-8".to_owned());
        };
        for link in split_outside_quotes(text, ',', true) {
            if link.trim().is_empty() {
                continue;
            }
            match link_target_if_next(link) {
                Ok(Some(target)) => return LinkNext::At(target),
                Ok(None) => {}
                Err(()) => {
                    return LinkNext::Unreadable(format!(
                        "a Link header value is not `<target>; rel=...`: {:?}",
                        shorten(link.trim())
                    ));
                }
            }
        }
    }
    LinkNext::None
}

/// Splits `text` at `separator`, except inside quoted strings (and, with `targets`,
/// inside `<...>`).
fn split_outside_quotes(text: &str, separator: char, targets: bool) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut in_target, mut in_quotes, mut escaped) = (0, false, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' if !in_target => in_quotes = !in_quotes,
            '<' if targets && !in_quotes => in_target = true,
            '>' if targets && !in_quotes => in_target = false,
            _ if c == separator && !in_quotes && !in_target => {
                parts.push(&text[start..at]);
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `<target>; rel="next"` → `Ok(Some(target))`; `rel` may list several types
/// (`"next last"`). `Err` when the link is not of that form.
fn link_target_if_next(link: &str) -> Result<Option<String>, ()> {
    let rest = link.trim().strip_prefix('<').ok_or(())?;
    let end = rest.find('>').ok_or(())?;
    let (target, params) = (&rest[..end], &rest[end + 1..]);
    let is_next = split_outside_quotes(params, ';', false)
        .into_iter()
        .any(|param| {
            let Some((name, value)) = param.split_once('=') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("rel")
                && value
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|rel| rel.eq_ignore_ascii_case("next"))
        });
    Ok(is_next.then(|| target.trim().to_owned()))
}

/// At most 100 characters of `text`, for messages.
pub(crate) fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// "an object with keys data, meta", "a string", ...: what a pointer found instead.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "a boolean".to_owned(),
        Value::Number(_) => "a number".to_owned(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().take(8).map(|key| shorten(key)).collect();
            let more = if map.len() > keys.len() { ", ..." } else { "" };
            format!("an object with keys {}{more}", keys.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn links(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(LINK, HeaderValue::from_static(value));
        }
        headers
    }

    fn next(headers: &HeaderMap) -> Option<String> {
        match next_link(headers) {
            LinkNext::At(target) => Some(target),
            LinkNext::None => None,
            LinkNext::Unreadable(message) => panic!("{message}"),
        }
    }

    #[test]
    fn finds_the_next_link_among_others() {
        let headers = links(&[
            r#"<https://api.example.com/items?page=1>; rel="prev", <https://api.example.com/items?page=3>; rel="next", <https://api.example.com/items?page=9>; rel="last""#,
        ]);
        assert_eq!(
            next(&headers).as_deref(),
            Some("https://api.example.com/items?page=3")
        );
    }

    #[test]
    fn reads_rel_lists_unquoted_values_commas_in_targets_and_several_headers() {
        assert_eq!(
            next(&links(&[
                r#"</items?a=1,2>; title="x, y"; rel="next last""#
            ]))
            .as_deref(),
            Some("/items?a=1,2")
        );
        assert_eq!(next(&links(&["</p2>; REL=next"])).as_deref(), Some("/p2"));
        assert_eq!(
            next(&links(&[r#"</p1>; rel="prev""#, r#"</p3>; rel="next""#])).as_deref(),
            Some("/p3")
        );
    }

    #[test]
    fn no_next_link_means_none_and_garbage_is_reported() {
        assert_eq!(next(&HeaderMap::new()), None);
        assert_eq!(next(&links(&[r#"</p1>; rel="prev""#])), None);
        assert_eq!(next(&links(&[r#"</p1>; rel="nextish""#])), None);
        // A `;` inside a quoted parameter does not start a parameter.
        assert_eq!(next(&links(&[r#"</p4>; title="x;rel=next""#])), None);
        assert!(matches!(
            next_link(&links(&["garbage"])),
            LinkNext::Unreadable(_)
        ));
        let mut latin = HeaderMap::new();
        latin.insert(
            LINK,
            HeaderValue::from_bytes(b"</caf\xe9>; rel=next").unwrap(),
        );
        assert!(matches!(next_link(&latin), LinkNext::Unreadable(_)));
    }

    #[test]
    fn with_param_keeps_other_parameters_byte_for_byte() {
        let url = Url::parse("http://h/l?sig=a%2Fb%3D&flag&q=a%20b&page=3").unwrap();
        assert_eq!(
            with_param(&url, "page", "4").as_str(),
            "http://h/l?sig=a%2Fb%3D&flag&q=a%20b&page=4"
        );
        let bare = Url::parse("http://h/l").unwrap();
        assert_eq!(
            with_param(&bare, "a b", "c&d").as_str(),
            "http://h/l?a+b=c%26d"
        );
    }

    #[test]
    fn counting_styles_set_their_parameters() {
        let list = Url::parse("http://h/items?q=x&page=7").unwrap();
        let style = Pagination::page_number("page").first_page(0).style;
        let mut cursor = Cursor::start(&list, &style);
        let first = cursor.next.clone().unwrap();
        assert_eq!(first.as_str(), "http://h/items?q=x&page=0");
        let next = next_page(
            &style,
            &mut cursor,
            &first,
            &HeaderMap::new(),
            &Value::Null,
            3,
        );
        assert!(matches!(next, NextPage::At(url) if url.as_str() == "http://h/items?q=x&page=1"));

        let style = Pagination::offset_limit("offset", "limit", 50).style;
        let mut cursor = Cursor::start(&list, &style);
        let first = cursor.next.clone().unwrap();
        assert_eq!(
            first.as_str(),
            "http://h/items?q=x&page=7&offset=0&limit=50"
        );
        let next = next_page(
            &style,
            &mut cursor,
            &first,
            &HeaderMap::new(),
            &Value::Null,
            20,
        );
        assert!(
            matches!(next, NextPage::At(url) if url.as_str() == "http://h/items?q=x&page=7&limit=50&offset=20")
        );
        let last = next_page(
            &style,
            &mut cursor,
            &first,
            &HeaderMap::new(),
            &Value::Null,
            0,
        );
        assert!(matches!(last, NextPage::Last));
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(
            Pagination::next_url_at("links/next")
                .problem()
                .unwrap()
                .contains("`/`")
        );
        assert!(Pagination::offset_limit("o", "l", 0).problem().is_some());
        assert!(Pagination::cursor("/c", "").problem().is_some());
        assert!(Pagination::page_number("page").problem().is_none());
    }
}
