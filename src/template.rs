//! Detail-URL templates: `https://api.example.com/players/{id}?expand={id}`.
//!
//! A template is checked and normalised once, when the `FanOut` is built, into literal
//! pieces and holes. Rendering an id percent-encodes it between the pieces and builds
//! the [`Url`] reqwest needs from the template's origin, parsed once: only the path,
//! query and fragment are parsed per id, never the scheme and host (whose IDNA
//! processing costs more than the rest of the URL).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use url::{Position, Url};

use crate::error::{Error, ErrorKind};

/// Everything but RFC 3986's unreserved characters is encoded, so an id can never add a
/// path segment, start a query or fragment, or reach the authority: `/ ? # @ % + & =`,
/// spaces, control characters and non-ASCII all become `%XX`.
const ID: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const PLACEHOLDER: &str = "id";

pub(crate) struct UrlTemplate {
    /// The literal text before the first hole, normalised by the URL parser.
    head: Box<str>,
    /// The literal text after each hole.
    tails: Vec<Box<str>>,
    /// Path segments made of holes and dots only, where some ids would make the segment
    /// empty, `.` or `..` and so change which resource the URL names.
    dot_segments: Vec<DotSegment>,
    /// The template's scheme, host and port, with an empty path: each id's URL is a
    /// copy of this with the rendered path, query and fragment set.
    origin: Url,
}

impl std::fmt::Debug for UrlTemplate {
    /// The normalised template, `{id}` marking the holes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.head.to_string();
        for tail in &self.tails {
            text.push_str("{id}");
            text.push_str(tail);
        }
        std::fmt::Debug::fmt(&text, f)
    }
}

/// A path segment whose literal text is only dots (usually none: `/{id}/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DotSegment {
    literal_dots: usize,
    holes: usize,
}

impl DotSegment {
    fn rejects(self, id: &str) -> bool {
        id.bytes().all(|b| b == b'.') && self.literal_dots + self.holes * id.len() <= 2
    }
}

impl UrlTemplate {
    /// Checks and normalises `template`, appending `query` pairs to its query string.
    #[cfg(test)]
    pub(crate) fn parse(template: &str, query: &[(String, String)]) -> Result<Self, Error> {
        Self::parse_with(template, query, true)
    }

    /// Checks and normalises `template`, appending `query` pairs to its query string.
    /// A template without `{id}` (one URL for every id) is refused if `needs_id`.
    pub(crate) fn parse_with(
        template: &str,
        query: &[(String, String)],
        needs_id: bool,
    ) -> Result<Self, Error> {
        let raw_pieces = split_placeholders(template)?;
        let holes = raw_pieces.len() - 1;
        if holes == 0 && needs_id {
            return Err(invalid(
                template,
                "it has no `{id}` placeholder; write one where the id goes, \
                 e.g. https://api.example.com/items/{id}",
            ));
        }

        let sentinel = sentinel_for(template, query)?;
        let mut url = parse_absolute(template, &raw_pieces.join(&sentinel))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }

        let serialized = url.as_str();
        let path = url[..Position::BeforePath].len()..url[..Position::AfterPath].len();
        let query_range = url[..Position::BeforeQuery].len()..url[..Position::AfterQuery].len();
        let found: Vec<usize> = serialized
            .match_indices(sentinel.as_str())
            .map(|(at, _)| at)
            .collect();
        if found.len() != holes {
            return Err(invalid(
                template,
                "a `{id}` is removed by a `.` or `..` path segment next to it",
            ));
        }
        if let Some(&at) = found
            .iter()
            .find(|&&at| !path.contains(&at) && !query_range.contains(&at))
        {
            let place = if at < path.start {
                "the scheme, user info, host or port"
            } else {
                "the fragment"
            };
            return Err(invalid(
                template,
                &format!(
                    "`{{id}}` may only appear in the path or the query string, not in {place}"
                ),
            ));
        }

        let mut parts = serialized.split(sentinel.as_str());
        let head: Box<str> = parts.next().unwrap_or_default().into();
        let tails: Vec<Box<str>> = parts.map(Box::from).collect();

        let dot_segments = dot_segments(&serialized[path], &sentinel);
        let mut origin = url.clone();
        origin.set_path("");
        origin.set_query(None);
        origin.set_fragment(None);
        Ok(UrlTemplate {
            head,
            tails,
            dot_segments,
            origin,
        })
    }

    /// The scheme, host and port every rendered URL has.
    pub(crate) fn origin(&self) -> &Url {
        &self.origin
    }

    /// Renders the URL for `id` (the id's `Display` form) into `buf`, then builds it.
    ///
    /// `buf` is scratch space the caller reuses between ids.
    pub(crate) fn render(&self, id: &str, buf: &mut String) -> Result<Url, Error> {
        if let Some(segment) = self.dot_segments.iter().find(|s| s.rejects(id)) {
            let what = if segment.literal_dots + id.len() * segment.holes == 0 {
                "an empty path segment"
            } else {
                "a `.` or `..` path segment"
            };
            return Err(Error::new(
                ErrorKind::InvalidId,
                format!("it would make {what}, which changes the URL's path"),
            ));
        }

        buf.clear();
        buf.push_str(&self.head);
        for tail in &self.tails {
            buf.extend(utf8_percent_encode(id, ID));
            buf.push_str(tail);
        }

        // The head holds the whole origin (no hole can be there), and an id is encoded
        // to have no `?` or `#`: the first of each after the origin ends the path and
        // the query, as a parser of the whole text would find.
        let origin_len = self.origin[..Position::BeforePath].len();
        let (rest, fragment) = split(&buf[origin_len..], '#');
        let (path, query) = split(rest, '?');
        let mut url = self.origin.clone();
        url.set_path(path);
        url.set_query(query);
        url.set_fragment(fragment);
        // The parser must take the rendered text as it is: any change means the id
        // altered the URL's structure, which the encoding above is meant to prevent. A
        // URL that serialises to `buf` is the one `Url::parse(buf)` gives.
        if url.as_str() == buf.as_str() {
            Ok(url)
        } else {
            Err(Error::new(
                ErrorKind::InvalidId,
                format!("the rendered URL {buf:?} does not keep the template's structure"),
            ))
        }
    }
}

/// `text` before the first `delimiter`, and what follows it if there is one.
fn split(text: &str, delimiter: char) -> (&str, Option<&str>) {
    match text.split_once(delimiter) {
        Some((before, after)) => (before, Some(after)),
        None => (text, None),
    }
}

/// Splits at `{id}` placeholders, unescaping `{{` and `}}`.
fn split_placeholders(template: &str) -> Result<Vec<String>, Error> {
    let mut pieces = vec![String::new()];
    let mut chars = template.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.next_if(|&(_, c)| c == '{').is_some() => push(&mut pieces, '{'),
            '}' if chars.next_if(|&(_, c)| c == '}').is_some() => push(&mut pieces, '}'),
            '{' => {
                let rest = &template[at + 1..];
                let Some(len) = rest
                    .find(['{', '}'])
                    .filter(|&i| rest[i..].starts_with('}'))
                else {
                    return Err(invalid(
                        template,
                        &format!(
                            "the `{{` at byte {at} is not closed; write `{{{{` for a literal brace"
                        ),
                    ));
                };
                let name = &rest[..len];
                if name != PLACEHOLDER {
                    let placeholder = format!("{{{name}}}");
                    // Not quoted if it is part of a password the message hides.
                    let quoted = if redact_userinfo(template).contains(&placeholder) {
                        format!("`{placeholder}`")
                    } else {
                        format!("at byte {at}")
                    };
                    return Err(invalid(
                        template,
                        &format!(
                            "unknown placeholder {quoted}; the only placeholder is `{{id}}` \
                             (write `{{{{` and `}}}}` for literal braces)"
                        ),
                    ));
                }
                for _ in 0..=len {
                    chars.next();
                }
                pieces.push(String::new());
            }
            '}' => {
                return Err(invalid(
                    template,
                    &format!(
                        "the `}}` at byte {at} has no opening `{{`; write `}}}}` for a literal brace"
                    ),
                ));
            }
            c => push(&mut pieces, c),
        }
    }
    Ok(pieces)
}

fn push(pieces: &mut [String], c: char) {
    if let Some(last) = pieces.last_mut() {
        last.push(c);
    }
}

/// An alphanumeric marker that the URL parser leaves alone and the template does not contain.
///
/// The URL parser drops tabs and line breaks and the query pairs are appended after
/// parsing, so the marker must be absent from all of those, compared without them.
fn sentinel_for(template: &str, query: &[(String, String)]) -> Result<String, Error> {
    let mut lower: String = template
        .chars()
        .filter(|c| !matches!(c, '\t' | '\r' | '\n'))
        .collect();
    for (key, value) in query {
        lower.push(' ');
        lower.push_str(key);
        lower.push(' ');
        lower.push_str(value);
    }
    lower.make_ascii_lowercase();
    // Each position of the text can start at most one of these markers, so one of the
    // first `len + 1` is always absent.
    (0..=lower.len())
        .map(|n| format!("fanouthole{n}x"))
        .find(|s| !lower.contains(s.as_str()))
        .ok_or_else(|| invalid(template, "no placeholder marker fits it"))
}

fn parse_absolute(template: &str, text: &str) -> Result<Url, Error> {
    let url = Url::parse(text).map_err(|err| match err {
        url::ParseError::RelativeUrlWithoutBase => invalid(
            template,
            "it is a relative URL; give an absolute http(s) URL such as \
             https://api.example.com/items/{id}",
        ),
        err => invalid(template, &format!("it is not a valid URL ({err})")),
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        // The template is not quoted: it holds a credential.
        return Err(Error::new(
            ErrorKind::InvalidTemplate,
            "detail URL template: it has a user name or password before the host; \
             credentials in URLs are not sent and would show in errors, so pass them with \
             .bearer_auth(...) or .header(\"authorization\", ...) instead",
        ));
    }
    match url.scheme() {
        "http" | "https" if url.has_host() => Ok(url),
        "http" | "https" => Err(invalid(template, "it has no host")),
        scheme => Err(invalid(
            template,
            &format!("its scheme is `{scheme}`; only http and https are supported"),
        )),
    }
}

fn dot_segments(path: &str, sentinel: &str) -> Vec<DotSegment> {
    path.split('/')
        .filter_map(|segment| {
            let holes = segment.matches(sentinel).count();
            let literal = segment.replace(sentinel, "");
            (holes > 0 && literal.bytes().all(|b| b == b'.')).then_some(DotSegment {
                literal_dots: literal.len(),
                holes,
            })
        })
        .collect()
}

fn invalid(template: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidTemplate,
        format!("detail URL template {:?}: {why}", redact_userinfo(template)),
    )
}

/// `url` with any `user:password@` replaced by `***@`, for quoting in errors.
///
/// Errs on the side of hiding: a password may hold `/`, `#` or `?` (unencoded, which
/// makes the URL invalid, and so quoted in an error), so everything from the start of
/// the authority (after `scheme:` and any `/` or `\`) to the last `@` is hidden.
/// Tabs, line breaks and surrounding spaces, which a URL parser ignores, are dropped
/// first, so that they cannot hide the scheme.
pub(crate) fn redact_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    if !url.contains('@') {
        return url.into();
    }
    let cleaned: String = url
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\r' | '\n'))
        .collect();
    let is_scheme = |scheme: &str| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    let after_scheme = match cleaned.find(':').filter(|&at| is_scheme(&cleaned[..at])) {
        Some(colon) => &cleaned[colon + 1..],
        None => &cleaned[..],
    };
    let start = cleaned.len() - after_scheme.trim_start_matches(['/', '\\']).len();
    match cleaned[start..].rfind('@') {
        Some(at) => format!("{}***{}", &cleaned[..start], &cleaned[start + at..]).into(),
        None => cleaned.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, id: &str) -> Result<String, Error> {
        let t = UrlTemplate::parse(template, &[])?;
        t.render(id, &mut String::new()).map(|u| u.to_string())
    }

    fn parse_err(template: &str) -> String {
        let err = UrlTemplate::parse(template, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{err}");
        err.to_string()
    }

    #[test]
    fn renders_in_path_and_query_more_than_once() {
        assert_eq!(
            render("http://h.test/items/{id}?q={id}&x=1", "42").unwrap(),
            "http://h.test/items/42?q=42&x=1"
        );
        assert_eq!(
            render("https://h.test/a/{id}.json", "7").unwrap(),
            "https://h.test/a/7.json"
        );
    }

    #[test]
    fn hostile_ids_stay_inside_one_segment_or_value() {
        let cases = [
            ("../admin", "..%2Fadmin"),
            ("a/b", "a%2Fb"),
            ("x?y#z", "x%3Fy%23z"),
            ("名前", "%E5%90%8D%E5%89%8D"),
            ("with space", "with%20space"),
            ("@evil.test", "%40evil.test"),
            ("%2F", "%252F"),
            ("a\\b", "a%5Cb"),
            ("tab\tnl\n", "tab%09nl%0A"),
            ("a+b&c=d", "a%2Bb%26c%3Dd"),
        ];
        for (id, encoded) in cases {
            assert_eq!(
                render("http://h.test/items/{id}?q={id}", id).unwrap(),
                format!("http://h.test/items/{encoded}?q={encoded}"),
                "id {id:?}"
            );
        }
    }

    #[test]
    fn dot_and_empty_segments_are_refused() {
        for id in ["", ".", ".."] {
            let err = render("http://h.test/items/{id}/details", id).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidId, "id {id:?}");
        }
        let err = render("http://h.test/items/.{id}", ".").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidId);
        // Not a whole segment, or in the query: harmless.
        assert_eq!(
            render("http://h.test/items/{id}.json", "..").unwrap(),
            "http://h.test/items/...json"
        );
        assert_eq!(
            render("http://h.test/items/x{id}", "").unwrap(),
            "http://h.test/items/x"
        );
        assert_eq!(
            render("http://h.test/items?q={id}", "..").unwrap(),
            "http://h.test/items?q=.."
        );
        assert_eq!(
            render("http://h.test/{id}", "...").unwrap(),
            "http://h.test/..."
        );
    }

    #[test]
    fn urls_are_those_a_parser_of_the_whole_text_gives() {
        let templates = [
            "http://h.test/items/{id}",
            "https://h.test:8443/a/{id}/b?x=1&q={id}#frag",
            "http://h.test?q={id}",
            "http://h.test/{id}?",
            "http://[::1]:9/{id}#",
            "https://bücher.example/{id}.json?{id}",
            "HTTP://H.TEST/%7e/{id}/x%20y?a=%zz&b={id}",
        ];
        let mut ids: Vec<String> = (0..0x250u32)
            .filter_map(char::from_u32)
            .map(String::from)
            .collect();
        ids.extend(["", "42", "...", "a/b", "%2e%2E", "x?y#z", "名前", "\\..\\"].map(String::from));
        for template in templates {
            let parsed = UrlTemplate::parse(template, &[("k".into(), "v w".into())]).unwrap();
            for id in &ids {
                let mut buf = String::new();
                let url = match parsed.render(id, &mut buf) {
                    Ok(url) => url,
                    // Refused only as a `.`, `..` or empty segment.
                    Err(_) if id.bytes().all(|b| b == b'.') && id.len() <= 2 => continue,
                    Err(err) => panic!("{template} with {id:?}: {err}"),
                };
                assert_eq!(url.as_str(), buf, "{template} with {id:?}");
                assert_eq!(
                    Url::parse(&buf).as_ref(),
                    Ok(&url),
                    "{template} with {id:?}"
                );
            }
        }
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(
            render("http://h.test/{{x}}/{id}", "1").unwrap(),
            "http://h.test/%7Bx%7D/1"
        );
    }

    #[test]
    fn extra_query_pairs_are_appended_once() {
        let query = [
            ("token".to_owned(), "s e&c".to_owned()),
            ("include".to_owned(), "stats".to_owned()),
        ];
        let t = UrlTemplate::parse("http://h.test/p/{id}?a=1", &query).unwrap();
        assert_eq!(
            t.render("9", &mut String::new()).unwrap().as_str(),
            "http://h.test/p/9?a=1&token=s+e%26c&include=stats"
        );
    }

    #[test]
    fn template_is_normalised_once() {
        assert_eq!(
            render("HTTP://H.Test:80/a/../b/{id}", "1").unwrap(),
            "http://h.test/b/1"
        );
    }

    #[test]
    fn invalid_templates_say_what_to_fix() {
        assert!(parse_err("http://h.test/items/").contains("no `{id}`"));
        assert!(parse_err("http://h.test/{name}").contains("unknown placeholder `{name}`"));
        assert!(parse_err("http://h.test/{id").contains("not closed"));
        assert!(parse_err("http://h.test/{i{d}").contains("not closed"));
        assert!(parse_err("http://h.test/id}/{id}").contains("no opening"));
        assert!(parse_err("/items/{id}").contains("relative URL"));
        assert!(parse_err("items/{id}").contains("relative URL"));
        assert!(parse_err("ftp://h.test/{id}").contains("scheme is `ftp`"));
        assert!(parse_err("file:///tmp/{id}").contains("scheme is `file`"));
        assert!(parse_err("http://{id}.h.test/x").contains("not in the scheme"));
        assert!(parse_err("http://h.test/x#{id}").contains("not in the fragment"));
        assert!(parse_err("http://h.test/{id}/../x").contains("removed"));
        assert!(parse_err("http://[::1/{id}").contains("not a valid URL"));
        assert!(parse_err("http://alice:s3cret@h.test/{id}").contains("user name or password"));
        assert!(parse_err("http://alice@h.test/{id}").contains(".bearer_auth"));
        assert!(!parse_err("http://alice:s3cret@h.test/{id}").contains("s3cret"));
        let err = parse_err("http://alice:s3cret@h.test/{name}");
        assert!(err.contains("\"http://***@h.test/{name}\""), "{err}");
    }

    #[test]
    fn the_marker_cannot_collide_through_stripped_whitespace_or_query_pairs() {
        // The parser strips the tab, which would turn this literal into the marker.
        let err = parse_err("http://h.test/fanout\thole0x/{id}/..");
        assert!(err.contains("removed"), "{err}");
        // A query value equal to the marker must not become a hole.
        let query = [("k".to_owned(), "fanouthole0x".to_owned())];
        let t = UrlTemplate::parse("http://h.test/items/{id}", &query).unwrap();
        assert_eq!(
            t.render("5", &mut String::new()).unwrap().as_str(),
            "http://h.test/items/5?k=fanouthole0x"
        );
        let err = UrlTemplate::parse("http://h.test/items/{id}/..", &query).unwrap_err();
        assert!(err.to_string().contains("removed"), "{err}");
    }

    #[test]
    fn a_template_containing_the_marker_still_works() {
        assert_eq!(
            render("http://h.test/fanouthole0x/{id}", "1").unwrap(),
            "http://h.test/fanouthole0x/1"
        );
    }
}
