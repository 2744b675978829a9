//! Hostile input, checked as properties rather than hand-picked cases: any id either
//! lands in exactly one path segment and one query value (and comes back intact) or is
//! refused unsent, and only the ids the docs name are refused; no template, list URL or
//! query pair makes `build()` panic or fail with anything but `InvalidTemplate`, and a
//! built template only ever substitutes the encoded id; header values with line breaks
//! or NULs are refused without being echoed; no error quotes a password given in a
//! template or list URL; a bearer token goes only to the template's host and never
//! shows in `Debug` output, errors or trace logs; a custom header (an API key) is never
//! carried by a redirect to another host.
//!
//! Each property test starts its server and runtime once, outside its cases; the id
//! property also shares one `FanOut`, so that each of its cases is one request.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fanout::{Error, ErrorKind, FanOut, FanOutBuilder, RetryPolicy};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::chaos::{ChaosServer, Fault};
use support::{Item, Log, percent_encode};
use url::Url;

type Check = Result<(), TestCaseError>;

/// Runs `test` on `cases` values of `strategy`, panicking with the smallest failing one.
#[track_caller]
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Check) {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    };
    if let Err(failure) = TestRunner::new(config).run(&strategy, test) {
        panic!("{failure}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A loopback port nothing listens on (it was bound a moment ago, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One request at a time, no retries: each case is exactly one attempt.
fn one_at_a_time<T>(template: &str) -> FanOut<String, T> {
    FanOut::builder()
        .detail_url(template)
        .concurrency(1)
        .retry(RetryPolicy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The outcome of fetching this one id.
fn fetch<T>(
    runtime: &tokio::runtime::Runtime,
    fan: &FanOut<String, T>,
    id: &str,
) -> Result<T, Error>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let mut results = runtime.block_on(fan.fan_out([id.to_owned()]).collect_ordered());
    assert_eq!(results.len(), 1);
    results.pop().unwrap()
}

/// Percent-decodes `text`, which may hold only RFC 3986 unreserved characters and `%XX`
/// escapes: any other raw character is one an id could have used to change the URL.
fn decode_strict(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = bytes
                    .get(at + 1..at + 3)
                    .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                    .ok_or_else(|| format!("a bad escape at byte {at} of {text:?}"))?;
                let hex = std::str::from_utf8(hex).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                at += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                decoded.push(b);
                at += 1;
            }
            b => return Err(format!("raw {:?} at byte {at} of {text:?}", b as char)),
        }
    }
    String::from_utf8(decoded).map_err(|err| format!("{text:?} is not UTF-8 once decoded: {err}"))
}

/// `k=v&k=v` pairs, each side strictly percent-decoded (ids are encoded with `%20`, and
/// a raw `+` would be an id's `+` left unencoded).
fn query_pairs_strict(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} in {query:?} has no `=`"))?;
            Ok((decode_strict(key)?, decode_strict(value)?))
        })
        .collect()
}

/// The pairs a form-decoding server (`+` is a space) reads from `query`.
fn query_pairs_form(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// The ids the builder docs say are refused for a template whose `{id}` is a whole path
/// segment: those that would make it empty, `.` or `..`.
fn makes_an_empty_or_dot_segment(id: &str) -> bool {
    matches!(id, "" | "." | "..")
}

/// Pieces that change a URL's structure when left unencoded, and some that look like
/// encodings or placeholders.
const ID_PIECES: &[&str] = &[
    "/",
    "..",
    ".",
    "%",
    "%2F",
    "%2f",
    "%2e",
    "%2E",
    "%00",
    "%zz",
    "%%",
    "?",
    "#",
    "@",
    ":",
    "\\",
    "+",
    "&",
    "=",
    " ",
    "\0",
    "\r",
    "\n",
    "\t",
    "\x7f",
    "",
    "a",
    "Z9",
    "-_~",
    "é",
    "名前",
    "\u{202e}",
    "\u{feff}",
    "\u{fffd}",
    "\u{10ffff}",
    "q=",
    "fixed=2",
    "&q=",
    "http://evil.test/",
    "//evil.test",
    "{id}",
    ";",
    ",",
    "'",
    "\"",
    "<>",
    "[",
    "]",
    "!$*()",
    "\u{1}",
    "\u{85}",
    "\u{2028}",
];

/// Ids heavy in URL delimiters, fully arbitrary ones, and runs of dots.
fn hostile_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(select(ID_PIECES), 0..8).prop_map(|pieces| pieces.concat()),
        3 => vec(any::<char>(), 0..12).prop_map(String::from_iter),
        1 => "\\.{0,4}",
        1 => "[./%2eE]{0,6}",
    ]
}

/// Short text: any Unicode, or URL delimiters and look-alike escapes.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        vec(any::<char>(), 0..12).prop_map(String::from_iter),
        vec(select(ID_PIECES), 0..6).prop_map(|pieces| pieces.concat()),
    ]
}

#[test]
fn any_id_lands_in_one_path_segment_and_one_query_value_or_is_refused_unsent() {
    let server = ChaosServer::always(Fault::Fine);
    let closed = closed_port();
    let template =
        |port: u16| format!("http://127.0.0.1:{port}/api/v1/items/{{id}}?q={{id}}&fixed=1");
    let fan = one_at_a_time::<Item>(&template(server.addr.port()));
    // The same template for a port nothing listens on: its errors show the URL built.
    let unsent = one_at_a_time::<Item>(&template(closed));
    let runtime = runtime();

    let case = |id: String| -> Check {
        let before = server.visits().len();
        let result = fetch(&runtime, &fan, &id);
        let visits = server.visits().split_off(before);
        let failed = fetch(&runtime, &unsent, &id).expect_err("nothing listens");
        prop_assert_eq!(failed.id(), Some(id.as_str()));

        if makes_an_empty_or_dot_segment(&id) {
            let err = result.expect_err("refused");
            prop_assert_eq!(err.kind(), ErrorKind::InvalidId, "{}", err);
            prop_assert_eq!(err.id(), Some(id.as_str()));
            prop_assert_eq!(err.attempts(), 0);
            prop_assert!(err.url().is_none(), "{:?}", err);
            prop_assert!(
                visits.is_empty(),
                "{:?} reached the server: {:?}",
                id,
                visits
            );
            prop_assert_eq!(failed.kind(), ErrorKind::InvalidId);
            return Ok(());
        }

        let item = match result {
            Ok(item) => item,
            Err(err) => return Err(TestCaseError::fail(format!("{id:?} failed: {err}"))),
        };
        prop_assert_eq!(&item.id, &id);
        prop_assert_eq!(visits.len(), 1, "{:?}", visits);
        let visit = &visits[0];

        // The path: the template's, then exactly one segment that decodes to the id.
        let segment = visit.path.strip_prefix("/api/v1/items/");
        prop_assert!(segment.is_some(), "{:?} was sent to {:?}", id, visit.path);
        let segment = segment.unwrap();
        prop_assert!(
            !segment.contains('/'),
            "{:?} split the path: {:?}",
            id,
            visit.path
        );
        prop_assert_eq!(decode_strict(segment), Ok(id.clone()));

        // The query: `q` is the id and `fixed` is 1, nothing else, however it is read.
        let query = visit.query.as_deref().unwrap_or_default();
        let expected = vec![
            ("q".to_owned(), id.clone()),
            ("fixed".to_owned(), "1".to_owned()),
        ];
        prop_assert_eq!(
            query_pairs_strict(query),
            Ok(expected.clone()),
            "query {:?}",
            query
        );
        prop_assert_eq!(query_pairs_form(query), expected);

        // The URL as built: the template's scheme, host and port, and what the server saw.
        prop_assert_eq!(failed.kind(), ErrorKind::Connect, "{}", failed);
        let url = failed.url().expect("a request was made");
        prop_assert_eq!(url.scheme(), "http");
        prop_assert_eq!(url.host_str(), Some("127.0.0.1"));
        prop_assert_eq!(url.port(), Some(closed));
        prop_assert_eq!(url.path(), visit.path.as_str());
        prop_assert_eq!(url.query(), visit.query.as_deref());
        prop_assert_eq!(url.fragment(), None);
        prop_assert_eq!(Url::parse(url.as_str()), Ok(url.clone()));
        Ok(())
    };

    // The edges of the refused set, every run.
    for id in [
        "", ".", "..", "...", "./", "/.", ". ", " ", "%2e", "%2e%2e", ".%2e", "\0", "/", "?",
    ] {
        case(id.to_owned()).unwrap_or_else(|err| panic!("{id:?}: {err}"));
    }
    check(800, hostile_id(), case);
}

const SCHEMES: &[&str] = &[
    "http://",
    "https://",
    "HTTP://",
    "hTtPs://",
    "ftp://",
    "//",
    "",
    "http:",
    "http:/",
    "http:///",
    "http:\\\\",
    "file:///",
    "mailto:",
    "ws://",
    "{id}://",
];
const HOSTS: &[&str] = &[
    "h.test",
    "127.0.0.1",
    "[::1]",
    "[::1",
    "::1",
    "bücher.example",
    "xn--",
    "",
    "user:pw@h.test",
    "user@h.test",
    ":pw@h.test",
    "@",
    "%66anouthole0x.test",
    "ｆａｎｏｕｔｈｏｌｅ０ｘ.test",
    "{id}.h.test",
    "h.test.",
    "256.1.1.1",
    "0x7f.1",
    "h_t.test",
    "h test",
];
const PORTS: &[&str] = &[
    "", ":80", ":443", ":0", ":65535", ":99999", ":", ":{id}", ":-1", ":8x",
];
const REST_PIECES: &[&str] = &[
    "/",
    "{id}",
    "{",
    "}",
    "{{",
    "}}",
    "{name}",
    "{id",
    "id}",
    "{{id}}",
    "{}",
    "{ID}",
    "%",
    "%2e",
    "%2E",
    "%2F",
    "%7B",
    "?",
    "#",
    "&",
    "=",
    "/..",
    "/.",
    "..",
    ".",
    "\\",
    "@",
    ":",
    " ",
    "\t",
    "\n",
    "\0",
    "é",
    "名",
    "\u{feff}",
    "fanouthole0x",
    "fanouthole1x",
    "x",
    "items",
    ";",
    "+",
    "[",
    "]",
    "|",
    "^",
    "`",
];
/// Path and query text that leaves the `{id}` next to it alone (no braces).
const PLAIN_PIECES: &[&str] = &[
    "/",
    "%",
    "%2e",
    "%2F",
    "?",
    "#",
    "&",
    "=",
    "/..",
    "/.",
    "..",
    ".",
    "\\",
    "@",
    ":",
    " ",
    "\t",
    "é",
    "fanouthole0x",
    "x",
    ";",
    "+",
    "|",
    "'",
];

/// Templates assembled from URL-ish pieces: mostly broken, some valid.
fn url_ish_template() -> impl Strategy<Value = String> {
    (
        select(SCHEMES),
        select(HOSTS),
        select(PORTS),
        vec(select(REST_PIECES), 0..10),
    )
        .prop_map(|(scheme, host, port, rest)| format!("{scheme}{host}{port}{}", rest.concat()))
}

/// Templates that usually build: an http(s) URL with `{id}` somewhere after the host.
fn buildable_template() -> impl Strategy<Value = String> {
    (
        select(vec!["http://", "https://", "HTTP://"]),
        select(vec![
            "h.test",
            "127.0.0.1",
            "[::1]",
            "bücher.example",
            "H.Test.",
        ]),
        select(vec!["", ":80", ":443", ":8080"]),
        vec(select(PLAIN_PIECES), 0..5),
        vec(select(PLAIN_PIECES), 0..5),
        1..3usize,
    )
        .prop_map(|(scheme, host, port, before, after, holes)| {
            let hole = format!("{}{{id}}", before.concat()).repeat(holes);
            format!("{scheme}{host}{port}/{hole}{}", after.concat())
        })
}

fn any_template() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => url_ish_template(),
        3 => buildable_template(),
        1 => vec(select(REST_PIECES), 0..16).prop_map(|pieces| pieces.concat()),
        1 => vec(any::<char>(), 0..40).prop_map(String::from_iter),
        1 => any::<String>(),
    ]
}

/// Ids rendered into every template that builds. `TAG` has nothing to encode, so
/// another id's URL is the same with `TAG` replaced by that id, encoded.
const TAG: &str = "zqTAGqz";
const RENDERED_IDS: &[&str] = &[
    "a/b?c#d", "../..", "名前", "%2F%2e", " +&=;", "\r\n\t\0", "{id}", "@h:1", "", ".", "..", "...",
];

#[test]
fn no_template_makes_build_panic_and_a_built_one_only_substitutes_the_encoded_id() {
    // Requests go to a proxy on a closed port: nothing leaves the machine, no name is
    // looked up, and each error carries the URL that would have been requested.
    let proxy = format!("http://127.0.0.1:{}", closed_port());
    let client = fanout::reqwest::Client::builder()
        .proxy(fanout::reqwest::Proxy::all(&proxy).unwrap())
        .build()
        .unwrap();
    let runtime = runtime();

    check(1000, any_template(), |template| {
        let built = FanOut::<String, serde_json::Value>::builder()
            .detail_url(&template)
            .build();
        if let Err(err) = built {
            prop_assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{}", err);
            prop_assert!(err.is_builder());
            return Ok(());
        }
        if template.contains(TAG) {
            return Ok(());
        }
        let fan = FanOut::<String, serde_json::Value>::builder()
            .detail_url(&template)
            .client(client.clone())
            .retry(RetryPolicy::none())
            .build()
            .unwrap();
        let url_of = |id: &str| match fetch(&runtime, &fan, id) {
            Ok(value) => Err(format!("{template:?} with {id:?} got an answer: {value}")),
            Err(err) if err.kind() == ErrorKind::InvalidId => Ok(None),
            Err(err) => match err.url() {
                Some(url) => Ok(Some(url.clone())),
                None => Err(format!("{template:?} with {id:?}: no URL in {err:?}")),
            },
        };
        let plain = url_of(TAG).map_err(TestCaseError::fail)?;
        let plain =
            plain.ok_or_else(|| TestCaseError::fail(format!("{template:?}: {TAG} refused")))?;
        prop_assert!(plain.as_str().contains(TAG), "{} lost the id", plain);
        for &id in RENDERED_IDS {
            match url_of(id).map_err(TestCaseError::fail)? {
                None => prop_assert!(
                    matches!(id, "" | "." | ".."),
                    "{:?} refused {:?}",
                    template,
                    id
                ),
                Some(url) => {
                    let expected = plain.as_str().replace(TAG, &percent_encode(id));
                    prop_assert_eq!(url.as_str(), expected, "{:?} with {:?}", template, id);
                }
            }
        }
        Ok(())
    });
}

/// The two halves of a password no error message may quote any part of. Between them
/// goes one of [`PASSWORD_SEPARATORS`]: characters that end the authority where they
/// stand unencoded, and so make the URL invalid and quoted.
const PASSWORD: [&str; 2] = ["pw5ecr", "etXY"];
const PASSWORD_SEPARATORS: [&str; 9] = ["", "#", "/", "?", "\\", "@", "%", "{", "}"];

/// Forms of `scheme` + `user:password@`: the URL parser reads user info from all of
/// them, with or without `//`, and ignores the tabs, line breaks and surrounding
/// spaces that some of them carry.
fn template_with_credentials() -> impl Strategy<Value = String> {
    (
        select(vec!["", " ", "\t", "\n "]),
        select(vec![
            "http://",
            "https://",
            "http:",
            "http:/",
            "http:///",
            "http:\\\\",
            "HTTPS:/\\",
            "ht\ttp://",
            "http:\t//",
            "ftp://",
            "ws://",
        ]),
        select(PASSWORD_SEPARATORS.to_vec()),
        select(vec!["h.test", "[::1", "h.test:99999", "h.test:x", ""]),
        vec(select(REST_PIECES), 0..6),
    )
        .prop_map(|(space, scheme, separator, host, rest)| {
            let [head, tail] = PASSWORD;
            // After a `{`, the tail is a placeholder's name: `pw5ecr{etXY}`.
            let close = if separator == "{" { "}" } else { "" };
            format!(
                "{space}{scheme}user:{head}{separator}{tail}{close}@{host}/{}",
                rest.concat()
            )
        })
}

/// Neither half of the password is in any of `texts`.
fn password_hidden(url: &str, texts: &[String]) -> Check {
    for text in texts {
        for half in PASSWORD {
            prop_assert!(!text.contains(half), "{:?} gave {}", url, text);
        }
    }
    Ok(())
}

/// `builder`, given `url` with user info, is refused, and its error quotes no part of
/// the password.
fn refused_without_password(url: &str, builder: FanOutBuilder<String, Item>) -> Check {
    let err = builder
        .build()
        .expect_err("a URL with user info is refused");
    prop_assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
    password_hidden(url, &[err.to_string(), format!("{err:?}")])
}

#[test]
fn template_errors_never_quote_a_password() {
    check(300, template_with_credentials(), |template| {
        refused_without_password(&template, FanOut::builder().detail_url(&template))
    });
}

#[test]
fn list_url_errors_never_quote_a_password() {
    check(300, template_with_credentials(), |list_url| {
        let builder = FanOut::builder()
            .detail_url("http://h.test/items/{id}")
            .list_url(&list_url);
        refused_without_password(&list_url, builder)
    });
}

#[test]
fn no_list_url_makes_build_panic_or_fail_with_anything_but_an_invalid_template() {
    check(1000, any_template(), |list_url| {
        let built = FanOut::<String, serde_json::Value>::builder()
            .detail_url("http://h.test/items/{id}")
            .list_url(&list_url)
            .build();
        if let Err(err) = built {
            prop_assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{}", err);
        } else {
            let parsed = Url::parse(&list_url);
            prop_assert!(
                parsed
                    .as_ref()
                    .is_ok_and(|url| matches!(url.scheme(), "http" | "https")),
                "{:?} was taken as a list URL ({:?})",
                list_url,
                parsed
            );
        }
        Ok(())
    });
}

#[test]
fn any_query_pair_is_accepted_and_arrives_intact() {
    let server = ChaosServer::always(Fault::Fine);
    let runtime = runtime();
    let template = format!("{}?a=1&b={{id}}", server.template());
    check(200, (any_text(), any_text()), |(key, value)| {
        let built = FanOut::<String, Item>::builder()
            .detail_url(&template)
            .query(&[(key.as_str(), value.as_str())])
            .retry(RetryPolicy::none())
            .build();
        let fan = built.map_err(|err| TestCaseError::fail(format!("{key:?}={value:?}: {err}")))?;
        let before = server.visits().len();
        let item =
            fetch(&runtime, &fan, "7").map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(item.id, "7");
        let visits = server.visits().split_off(before);
        prop_assert_eq!(visits.len(), 1);
        prop_assert_eq!(&visits[0].path, "/items/7");
        // The extra pairs are form-encoded (a space is `+`), after the template's own.
        let query = visits[0].query.as_deref().unwrap_or_default();
        let expected = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "7".to_owned()),
            (key.clone(), value.clone()),
        ];
        prop_assert_eq!(query_pairs_form(query), expected, "query {:?}", query);
        Ok(())
    });
}

/// Text that marks a secret: found in any output, it leaked.
const SECRET: &str = "Zq7sEcReT9kX";

/// A header value with a `\r`, `\n` or `\0` somewhere around the secret.
fn bad_header_value() -> impl Strategy<Value = String> {
    (
        prop_oneof!["[ -~]{0,10}", any_text()],
        select(vec!['\r', '\n', '\0']),
        prop_oneof!["[ -~]{0,10}", any_text()],
        0..3usize,
    )
        .prop_map(|(before, bad, after, place)| match place {
            0 => format!("{before}{bad}{SECRET}{after}"),
            1 => format!("{before}{SECRET}{bad}{after}"),
            _ => format!("{before}{SECRET}{after}{bad}"),
        })
}

type Builder = FanOutBuilder<String, serde_json::Value>;

fn builder() -> Builder {
    FanOut::builder().detail_url("http://h.test/items/{id}")
}

#[test]
fn header_values_with_line_breaks_or_nuls_are_refused_without_being_echoed() {
    check(500, bad_header_value(), |value| {
        let setters: [(&str, Builder); 5] = [
            (
                "header(&str)",
                builder().header("x-api-key", value.as_str()),
            ),
            (
                "header(String)",
                builder().header("x-api-key", value.clone()),
            ),
            (
                "header(authorization)",
                builder().header("authorization", format!("Bearer {value}")),
            ),
            ("bearer_auth", builder().bearer_auth(&value)),
            // A good setting after the bad one does not hide it.
            (
                "bearer_auth, then header",
                builder().bearer_auth(&value).header("x-ok", "1"),
            ),
        ];
        for (how, setter) in setters {
            let debug = format!("{setter:?}");
            prop_assert!(!debug.contains(SECRET), "{}: builder {}", how, debug);
            let err = setter.build().expect_err("refused");
            prop_assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{}: {}", how, err);
            prop_assert!(err.is_builder());
            for text in [err.to_string(), format!("{err:?}"), format!("{err:#?}")] {
                prop_assert!(!text.contains(SECRET), "{}: {}", how, text);
            }
        }
        Ok(())
    });
}

/// A `FanOut` for `template` that sends the secret as a bearer token.
fn with_token(template: &str) -> FanOut<String, Item> {
    FanOut::builder()
        .detail_url(template)
        .bearer_auth(SECRET)
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

/// The same, with the `Authorization` header written out by hand.
fn with_authorization_header(template: &str) -> FanOut<String, Item> {
    FanOut::builder()
        .detail_url(template)
        .header("Authorization", format!("Bearer {SECRET}"))
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

type Configure = fn(&str) -> FanOut<String, Item>;

#[test]
fn a_bearer_token_is_not_sent_to_another_host_after_a_redirect() {
    let bearer = format!("Bearer {SECRET}");
    let ways: [(&str, Configure); 2] = [
        ("bearer_auth", with_token),
        ("header(\"Authorization\")", with_authorization_header),
    ];
    for (how, fan) in ways {
        let elsewhere = ChaosServer::always(Fault::Fine);
        let origin = ChaosServer::always(Fault::RedirectTo(elsewhere.url("/items/7")));
        let item = fetch(&runtime(), &fan(&origin.template()), "7").unwrap();
        assert_eq!(item.id, "7", "{how}");

        let first = origin.visits();
        assert_eq!(first.len(), 1, "{how}");
        assert_eq!(first[0].authorization(), Some(bearer.as_str()), "{how}");
        let second = elsewhere.visits();
        assert_eq!(second.len(), 1, "{how}");
        assert_eq!(second[0].path, "/items/7", "{how}");
        assert_eq!(
            second[0].authorization(),
            None,
            "{how}: the token went to another port"
        );
    }
}

#[test]
fn a_bearer_token_is_kept_on_a_same_host_redirect() {
    let bearer = format!("Bearer {SECRET}");
    let ways: [(&str, Configure); 2] = [
        ("bearer_auth", with_token),
        ("header(\"Authorization\")", with_authorization_header),
    ];
    for (how, fan) in ways {
        let server = ChaosServer::scripted(|id, _| match id {
            "7" => Fault::RedirectTo("/moved/seven".to_owned()),
            _ => Fault::Fine,
        });
        let item = fetch(&runtime(), &fan(&server.template()), "7").unwrap();
        assert_eq!(item.id, "seven", "{how}");

        let visits = server.visits();
        let paths: Vec<&str> = visits.iter().map(|visit| visit.path.as_str()).collect();
        assert_eq!(paths, ["/items/7", "/moved/seven"], "{how}");
        for visit in &visits {
            assert_eq!(
                visit.authorization(),
                Some(bearer.as_str()),
                "{how}: {visit:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_custom_header_never_follows_a_redirect_to_another_host() {
    // reqwest would forward `x-api-key` (it drops only credentials), so with a custom
    // header the default client does not follow the redirect: the id fails with the
    // 302, saying where it led, and the other host sees nothing.
    let elsewhere = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(support::echo_id)
        .mount(&elsewhere)
        .await;
    let other_port = format!("{}/items/7", elsewhere.uri());
    // The same port under another name is another host too; the port is known once
    // the server runs.
    let other_name = Arc::new(std::sync::OnceLock::<String>::new());
    let origin = ChaosServer::scripted({
        let (other_port, other_name) = (other_port.clone(), Arc::clone(&other_name));
        move |id, _| match id {
            "7" => Fault::RedirectTo(other_port.clone()),
            _ => Fault::RedirectTo(other_name.get().cloned().unwrap_or_default()),
        }
    });
    let localhost = format!("http://localhost:{}/items/8", origin.addr.port());
    other_name.set(localhost.clone()).unwrap();
    let fan = with_api_key(&origin.template());
    for (id, target) in [("7", other_port), ("8", localhost)] {
        let err = fan
            .fan_out([id.to_owned()])
            .try_collect_ordered()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Status, "{err}");
        assert_eq!(err.status().map(|s| s.as_u16()), Some(302));
        let text = err.to_string();
        assert!(
            text.contains(&format!("{target:?} was not followed")),
            "{text}"
        );
        assert!(text.contains("FanOutBuilder::header"), "{text}");
        assert_hidden("the error", &text);
    }
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
    let paths: Vec<String> = origin
        .visits()
        .into_iter()
        .map(|visit| visit.path)
        .collect();
    assert_eq!(paths, ["/items/7", "/items/8"]);
}

#[tokio::test]
async fn a_custom_header_follows_a_redirect_on_the_same_host_without_a_referer() {
    let server = ChaosServer::scripted(|id, _| match id {
        "7" => Fault::RedirectTo("/moved/seven".to_owned()),
        _ => Fault::Fine,
    });
    let items = with_api_key(&server.template())
        .fan_out(["7".to_owned()])
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(items[0].id, "seven");
    let visits = server.visits();
    assert_eq!(visits.len(), 2);
    for visit in &visits {
        assert_eq!(visit.headers["x-api-key"], SECRET, "{}", visit.path);
        assert!(
            !visit.headers.contains_key("referer"),
            "{:?}",
            visit.headers
        );
    }
}

/// A `FanOut` sending the secret in a custom header.
fn with_api_key(template: &str) -> FanOut<String, Item> {
    FanOut::builder()
        .detail_url(template)
        .header("x-api-key", SECRET)
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

#[track_caller]
fn assert_hidden(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} shows the secret: {text}");
}

/// Every form of an error a caller might print, its sources included.
fn error_texts(err: &Error) -> Vec<String> {
    let mut texts = vec![err.to_string(), format!("{err:?}"), format!("{err:#?}")];
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        texts.extend([cause.to_string(), format!("{cause:?}")]);
        source = cause.source();
    }
    texts
}

#[test]
fn a_bearer_token_never_shows_in_debug_output_of_the_builder_or_the_fan_out() {
    let configured = || {
        builder()
            .bearer_auth(SECRET)
            .query(&[("k", "v")])
            .concurrency(3)
    };
    assert_hidden("the builder's {:?}", &format!("{:?}", configured()));
    assert_hidden("the builder's {:#?}", &format!("{:#?}", configured()));
    let fan = configured().build().unwrap();
    assert_hidden("the FanOut's {:?}", &format!("{fan:?}"));
    assert_hidden("the FanOut's {:#?}", &format!("{fan:#?}"));
    assert_hidden("a clone's {:?}", &format!("{:?}", fan.clone()));
}

#[test]
fn a_secret_header_never_shows_in_debug_output_of_the_builder_or_the_fan_out() {
    let configured = || {
        builder()
            .header("X-Api-Key", SECRET)
            .header("Authorization", format!("Bearer {SECRET}"))
            .header("Cookie", format!("session={SECRET}"))
    };
    let debug = format!("{:?}", configured());
    assert_hidden("the builder's {:?}", &debug);
    assert!(
        debug.contains(r#"headers: ["x-api-key", "authorization", "cookie"]"#),
        "{debug}"
    );
    assert_hidden("the builder's {:#?}", &format!("{:#?}", configured()));
    let fan = configured().build().unwrap();
    assert_hidden("the FanOut's {:?}", &format!("{fan:?}"));
    assert_hidden("the FanOut's {:#?}", &format!("{fan:#?}"));
}

/// Answers by id: the faults whose errors are checked for the secret.
fn faulty_server() -> ChaosServer {
    ChaosServer::scripted(|id, attempt| match id {
        "unauthorized" => Fault::Status(401),
        "loop" => Fault::RedirectLoop,
        "slow" => Fault::Slow(Duration::from_secs(30)),
        "flaky" if attempt == 1 => Fault::Close,
        "flaky" => Fault::Status(503),
        "list" => Fault::Status(401),
        _ => Fault::Fine,
    })
}

/// A `FanOut` carrying the secret as a bearer token and as an API-key header, retrying
/// quickly.
fn with_secrets(template: &str) -> FanOut<String, Item> {
    secrets_builder(template).build().unwrap()
}

fn secrets_builder(template: &str) -> FanOutBuilder<String, Item> {
    FanOut::builder()
        .detail_url(template)
        .bearer_auth(SECRET)
        .header("X-Api-Key", SECRET)
        // Long enough for any answer but the one that never comes.
        .timeout(Duration::from_secs(1))
        .retry(
            RetryPolicy::exponential()
                .max_retries(1)
                .initial_delay(Duration::from_millis(1)),
        )
}

#[test]
fn a_bearer_token_never_shows_in_errors_of_failed_requests() {
    let server = faulty_server();
    let runtime = runtime();
    let fan = with_secrets(&server.template());
    let refused = with_secrets(&format!("http://127.0.0.1:{}/items/{{id}}", closed_port()));

    let expected = [
        ("unauthorized", ErrorKind::Status, &fan),
        ("loop", ErrorKind::Request, &fan),
        ("slow", ErrorKind::Timeout, &fan),
        ("flaky", ErrorKind::Status, &fan),
        ("refused", ErrorKind::Connect, &refused),
    ];
    for (id, kind, fan) in expected {
        let err = fetch(&runtime, fan, id).expect_err(id);
        assert_eq!(err.kind(), kind, "{id}: {err}");
        for text in error_texts(&err) {
            assert_hidden(id, &text);
        }
    }
    // The secret did go out: it is the error output, not the request, that lacks it.
    let visit = &server.visits()[0];
    assert_eq!(
        visit.authorization(),
        Some(format!("Bearer {SECRET}").as_str())
    );
}

#[test]
fn a_bearer_token_never_shows_in_trace_logs_of_a_run_with_retries_and_failures() {
    let server = faulty_server();
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Scoped to this thread, and the runtime is current-thread, so every event of the
    // run (and none of the other tests') is written.
    tracing::subscriber::with_default(subscriber, || {
        let runtime = runtime();
        let template = server.template();
        let fan = secrets_builder(&template)
            .list_url(&server.url("/list"))
            .build()
            .unwrap();
        let ids = ["flaky", "unauthorized", "loop", "ok", "slow"].map(str::to_owned);
        let results = runtime.block_on(fan.fan_out(ids).collect_ordered());
        assert_eq!(results.iter().filter(|result| result.is_ok()).count(), 1);
        // A failed list whose error is not taken is logged as a warning.
        let listed: Vec<_> = runtime.block_on(futures::StreamExt::collect(
            fan.fan_out_listed().as_completed(),
        ));
        assert!(listed.is_empty());
    });

    let text = log.text();
    assert!(text.contains("retrying"), "no retry was logged: {text}");
    assert!(
        text.contains("WARN"),
        "the failed list was not logged: {text}"
    );
    assert_hidden("the trace log", &text);
}
