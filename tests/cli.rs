//! The `fanout` command end to end, against servers on loopback: the lines it writes,
//! its exit codes, and a run killed with SIGKILL then resumed.
#![cfg(feature = "cli")]

mod support;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::GaugeServer;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A server that runs on a runtime of its own while the command runs.
struct Api {
    server: GaugeServer,
    _runtime: tokio::runtime::Runtime,
}

impl Api {
    fn start(script: impl Fn(&str) -> (Duration, StatusCode) + Send + Sync + 'static) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(GaugeServer::scripted(script));
        Api {
            server,
            _runtime: runtime,
        }
    }

    fn template(&self) -> String {
        self.server.template()
    }

    /// The ids requested, each as often as it was.
    fn requested(&self) -> Vec<String> {
        self.server.gauge.ids()
    }
}

fn fanout() -> assert_cmd::Command {
    let mut command = assert_cmd::Command::new(env!("CARGO_BIN_EXE_fanout"));
    command.timeout(Duration::from_secs(60));
    command
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fanout-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines_of(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line:?}: {err}")))
        .collect()
}

fn read_lines(path: &Path) -> Vec<Value> {
    lines_of(&std::fs::read_to_string(path).unwrap())
}

fn exit_code(output: &std::process::Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

#[test]
fn one_json_line_per_id_and_exit_2_when_some_failed() {
    let api = Api::start(|id| match id {
        "13" => (Duration::ZERO, StatusCode::NOT_FOUND),
        _ => (Duration::ZERO, StatusCode::OK),
    });
    let output = fanout()
        .args(["--detail-url", &api.template(), "--ordered"])
        .write_stdin("1\n13\nx y\n")
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 2, "{output:?}");
    let lines = lines_of(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        json!({"id": "1", "ok": true, "data": {"id": "1"}})
    );
    assert_eq!(
        lines[2],
        json!({"id": "x y", "ok": true, "data": {"id": "x y"}})
    );
    let failed = &lines[1];
    assert_eq!(failed["id"], "13");
    assert_eq!(failed["ok"], false);
    let error = &failed["error"];
    assert_eq!(error["kind"], "status");
    assert_eq!(error["status"], 404);
    assert_eq!(error["attempts"], 1);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("404 Not Found") && message.contains("scripted"),
        "{message}"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("2 succeeded, 1 failed (404 Not Found: 1)"),
        "{stderr}"
    );
}

#[test]
fn an_ids_file_with_blank_lines_and_repeats_fetches_each_id_once_and_exits_0() {
    let api = Api::start(|_| (Duration::ZERO, StatusCode::OK));
    let dir = scratch("ids-file");
    let ids = dir.join("ids.txt");
    std::fs::write(&ids, "a\n\n  b  \r\nc\na\n\n\nb\nd").unwrap();
    let out = dir.join("out.ndjson");
    let output = fanout()
        .args(["--detail-url", &api.template(), "-c", "2", "--ids-file"])
        .arg(&ids)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 0, "{output:?}");
    assert!(output.stdout.is_empty());
    let mut written: Vec<String> = read_lines(&out)
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["a", "b", "c", "d"]);
    let mut requested = api.requested();
    requested.sort();
    assert_eq!(requested, ["a", "b", "c", "d"]);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("2 skipped"), "{stderr}");
}

#[test]
fn a_bad_template_is_one_line_on_stderr_and_exit_1() {
    let output = fanout()
        .args(["--detail-url", "http://127.0.0.1:9/items/{name}"])
        .write_stdin("1\n")
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 1);
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("fanout: error: invalid URL template"),
        "{stderr}"
    );
    assert!(stderr.contains("{name}"), "{stderr}");
}

#[test]
fn usage_and_configuration_errors_exit_1() {
    let template = "http://127.0.0.1:9/items/{id}";
    let cases: [(&[&str], &str); 7] = [
        (
            &["--detail-url", template, "--no-such-flag"],
            "--no-such-flag",
        ),
        (&["--detail-url", template, "--resume"], "--output"),
        (&["--detail-url", template, "-c", "0"], "concurrency"),
        (
            &["--detail-url", template, "--timeout", "soon"],
            "not a duration",
        ),
        (&["--detail-url", template, "-H", "no colon"], "Name: value"),
        (
            &[
                "--detail-url",
                template,
                "--bearer-env",
                "FANOUT_TEST_UNSET_TOKEN",
            ],
            "is not set",
        ),
        (
            &[
                "--detail-url",
                template,
                "--bearer-env",
                "FANOUT_TEST_TOKEN",
                "-H",
                "authorization: x",
            ],
            "both set the Authorization header",
        ),
    ];
    for (args, says) in cases {
        let output = fanout()
            .args(args)
            .env_remove("FANOUT_TEST_UNSET_TOKEN")
            .env("FANOUT_TEST_TOKEN", "t")
            .write_stdin("1\n")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(exit_code(&output), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // --help is not an error.
    let output = fanout().arg("--help").output().unwrap();
    assert_eq!(exit_code(&output), 0);
    assert!(
        String::from_utf8(output.stdout)
            .unwrap()
            .contains("--resume")
    );
}

#[test]
fn an_existing_output_is_kept_unless_resumed_or_overwritten() {
    let api = Api::start(|_| (Duration::ZERO, StatusCode::OK));
    let dir = scratch("existing");
    let out = dir.join("out.ndjson");
    std::fs::write(&out, "precious\n").unwrap();
    let run = |extra: &[&str]| {
        fanout()
            .args(["--detail-url", &api.template(), "-o"])
            .arg(&out)
            .args(extra)
            .write_stdin("1\n")
            .output()
            .unwrap()
    };
    let output = run(&[]);
    assert_eq!(exit_code(&output), 1);
    assert!(String::from_utf8(output.stderr).unwrap().contains("exists"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
    // Not a file this command wrote: resuming into it is refused too.
    let output = run(&["--resume"]);
    assert_eq!(exit_code(&output), 1);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
    let output = run(&["--overwrite"]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(read_lines(&out).len(), 1);
}

#[test]
fn killed_at_half_then_resumed_every_id_is_in_the_file_exactly_once() {
    const IDS: usize = 1000;
    let api = Api::start(|_| (Duration::from_millis(4), StatusCode::OK));
    let dir = scratch("kill");
    let ids = dir.join("ids.txt");
    let text: String = (1..=IDS).map(|n| format!("{n}\n")).collect();
    std::fs::write(&ids, text).unwrap();
    let out = dir.join("out.ndjson");
    let command = |resume: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
        command
            .args(["--detail-url", &api.template(), "-c", "4", "--ids-file"])
            .arg(&ids)
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if resume {
            command.arg("--resume");
        }
        command
    };

    let mut child = command(false).spawn().unwrap();
    let started = Instant::now();
    let written = loop {
        let written =
            std::fs::read(&out).map_or(0, |bytes| bytes.iter().filter(|&&b| b == b'\n').count());
        if written >= IDS / 2 {
            break written;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {written} lines after 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Requests the killed run had sent reach the server's count before it is read.
    std::thread::sleep(Duration::from_millis(200));
    let before: HashSet<String> = read_lines(&out)
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        before.len() >= written && before.len() < IDS,
        "{} lines at the kill",
        before.len()
    );
    let requested_before = api.requested().len();
    // As if the kill had come in the middle of a write.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .unwrap()
        .write_all(b"{\"id\":\"999\",\"ok\":tr")
        .unwrap();

    let resumed = command(true).output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert_eq!(exit_code(&resumed), 0, "{stderr}");
    assert!(stderr.contains("cut off a torn last line"), "{stderr}");
    let lines = read_lines(&out);
    let ids_written: Vec<String> = lines
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_owned())
        .collect();
    let distinct: HashSet<&String> = ids_written.iter().collect();
    assert_eq!(ids_written.len(), IDS, "every id exactly once");
    assert_eq!(distinct.len(), IDS);
    assert!(lines.iter().all(|line| line["ok"] == true));
    // The resumed run asked only for what the file did not have.
    let again = &api.requested()[requested_before..];
    assert_eq!(again.len(), IDS - before.len(), "{stderr}");
    assert!(again.iter().all(|id| !before.contains(id)));
}

#[test]
fn a_resumed_run_tries_failed_ids_again_and_keeps_one_line_each() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&healthy);
    let api = Api::start(move |id| {
        let broken = id.parse::<u32>().unwrap() % 10 == 0 && !flag.load(Ordering::SeqCst);
        let status = if broken {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        (Duration::ZERO, status)
    });
    let dir = scratch("failed");
    let out = dir.join("out.ndjson");
    let ids: String = (1..=50).map(|n| format!("{n}\n")).collect();
    let run = |resume: bool| {
        let mut command = fanout();
        command
            .args(["--detail-url", &api.template(), "-o"])
            .arg(&out);
        if resume {
            command.arg("--resume");
        }
        command.write_stdin(ids.clone()).output().unwrap()
    };

    assert_eq!(exit_code(&run(false)), 2);
    let first = read_lines(&out);
    assert_eq!(first.len(), 50);
    assert_eq!(first.iter().filter(|line| line["ok"] == false).count(), 5);

    healthy.store(true, Ordering::SeqCst);
    let output = run(true);
    assert_eq!(exit_code(&output), 0, "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("45 ids done before, 5 failed ids to try again"),
        "{stderr}"
    );
    assert!(
        stderr.contains("removed the 5 earlier failure lines"),
        "{stderr}"
    );
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 50);
    assert!(lines.iter().all(|line| line["ok"] == true));
    let distinct: HashSet<String> = lines.iter().map(|line| line["id"].to_string()).collect();
    assert_eq!(distinct.len(), 50);
    assert_eq!(api.requested().len(), 55);
}

#[test]
fn ids_from_a_paginated_list_keep_their_type_and_the_token_comes_from_the_environment() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/players"))
            .and(query_param("page", "2"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"data": [{"player": 3}]})),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/players"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"data": [{"player": 1}, {"player": 2}]}))
                    .insert_header("Link", "</players?page=2>; rel=\"next\""),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(wiremock::matchers::path_regex("^/players/[0-9]+$"))
            .and(header("authorization", "Bearer s3cret"))
            .and(header("x-team", "za"))
            .respond_with(support::echo_id)
            .mount(&server)
            .await;
        server
    });
    let output = fanout()
        .args(["--list-url", &format!("{}/players", server.uri())])
        .args(["--ids-at", "/data", "--id-field", "player", "--link-header"])
        .args(["--detail-url", &format!("{}/players/{{id}}", server.uri())])
        .args([
            "--bearer-env",
            "FANOUT_TEST_TOKEN",
            "-H",
            "X-Team: za",
            "--ordered",
        ])
        .env("FANOUT_TEST_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 0, "{output:?}");
    let lines = lines_of(&String::from_utf8(output.stdout).unwrap());
    let ids: Vec<&Value> = lines.iter().map(|line| &line["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(2), &json!(3)]);
    assert!(!String::from_utf8(output.stderr).unwrap().contains("s3cret"));
}

#[test]
fn unreadable_input_stops_after_the_ids_before_it_with_exit_1() {
    let api = Api::start(|_| (Duration::ZERO, StatusCode::OK));
    let output = fanout()
        .args(["--detail-url", &api.template(), "--ordered"])
        .write_stdin(b"1\n2\n\xff\xfe\n3\n".to_vec())
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 1);
    let lines = lines_of(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(lines.len(), 2);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("line 3 of standard input is not UTF-8"),
        "{stderr}"
    );
    let mut requested = api.requested();
    requested.sort();
    assert_eq!(requested, ["1", "2"]);
}
