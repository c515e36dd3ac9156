//! A tiny QMP client: enough to ask QEMU which thread runs which vCPU
//! (`query-cpus-fast`, QEMU 2.12+) and iothread (`query-iothreads`).
//!
//! QMP is line-oriented JSON over a Unix socket: a greeting, then
//! `qmp_capabilities`, then commands; asynchronous events may arrive
//! between replies and are skipped. No crate for this is maintained for
//! today's QEMU (`qapi` pulls a code generator for the whole schema), and
//! the protocol part needed here is ~60 lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use vcore::host::threads::{KnownThreads, Source};

/// A QMP connection after capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).context("cannot connect")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .context("cannot read a reply")?;
            if n == 0 {
                bail!("QEMU closed the connection");
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line).with_context(|| format!("bad JSON: {line:?}"));
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        let mut msg = json!({ "execute": command }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .context("cannot send a command")?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                bail!("{command} failed: {desc}");
            }
            bail!("unexpected reply to {command}: {reply}");
        }
    }
}

/// Parses `query-cpus-fast` and `query-iothreads` replies.
pub fn parse_threads(cpus: &Value, iothreads: Option<&Value>) -> Result<KnownThreads> {
    let list = cpus
        .as_array()
        .ok_or_else(|| anyhow!("query-cpus-fast did not return a list"))?;
    let mut vcpus = Vec::new();
    for cpu in list {
        let index = cpu.get("cpu-index").and_then(Value::as_u64);
        let tid = cpu.get("thread-id").and_then(Value::as_i64);
        match (index, tid) {
            (Some(i), Some(t)) => vcpus.push((i as u32, t as i32)),
            _ => bail!("query-cpus-fast entry without cpu-index/thread-id: {cpu}"),
        }
    }
    let mut io = Vec::new();
    for t in iothreads.and_then(Value::as_array).into_iter().flatten() {
        if let (Some(id), Some(tid)) = (
            t.get("id").and_then(Value::as_str),
            t.get("thread-id").and_then(Value::as_i64),
        ) {
            io.push((id.to_string(), tid as i32));
        }
    }
    Ok(KnownThreads {
        source: Source::Qmp,
        vcpus,
        io,
    })
}

/// Asks QEMU at `path` for its vCPU and iothread thread ids.
pub fn query_threads(path: &Path) -> Result<KnownThreads> {
    let mut qmp = Qmp::connect(path)?;
    let cpus = qmp.execute("query-cpus-fast")?;
    // query-iothreads exists in every QEMU with query-cpus-fast; tolerate
    // its absence anyway (a build without iothread support).
    let io = qmp.execute("query-iothreads").ok();
    parse_threads(&cpus, io.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_replies() {
        let cpus = json!([
            {"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 101,
             "props": {"core-id": 0}, "target": "x86_64"},
            {"cpu-index": 1, "thread-id": 102, "target": "x86_64"}
        ]);
        let io = json!([{"id": "iothread0", "thread-id": 103, "poll-max-ns": 32768}]);
        let k = parse_threads(&cpus, Some(&io)).unwrap();
        assert_eq!(k.vcpus, [(0, 101), (1, 102)]);
        assert_eq!(k.io, [("iothread0".to_string(), 103)]);
        assert!(parse_threads(&json!({}), None).is_err());
        assert!(parse_threads(&json!([{"cpu-index": 0}]), None).is_err());
    }

    /// A scripted QMP server: greeting, an event before a reply, an error.
    #[test]
    fn talks_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut lines = BufReader::new(stream).lines();
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut seen = Vec::new();
            while let Some(Ok(line)) = lines.next() {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let name = cmd["execute"].as_str().unwrap().to_string();
                let reply = match name.as_str() {
                    "qmp_capabilities" => "{\"return\": {}}\r\n".to_string(),
                    "query-cpus-fast" => "{\"event\": \"RESUME\", \"data\": {}}\r\n\
                         {\"return\": [{\"cpu-index\": 0, \"thread-id\": 7}]}\r\n"
                        .to_string(),
                    _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\r\n"
                        .to_string(),
                };
                seen.push(name);
                out.write_all(reply.as_bytes()).unwrap();
            }
            seen
        });
        let k = query_threads(&sock).unwrap();
        assert_eq!(k.vcpus, [(0, 7)]);
        assert!(k.io.is_empty());
        assert_eq!(
            server.join().unwrap(),
            ["qmp_capabilities", "query-cpus-fast", "query-iothreads"]
        );
    }
}
