//! Requests per client as the API server recorded them: the audit log's completed requests of the
//! benchmark identity, tallied by the label in their User-Agent. Reads the log incrementally, so a
//! long run does not parse it again for every phase.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::{Context, Result};

/// Requests and, of them, writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Requests {
    pub total: u64,
    pub writes: u64,
}

/// The audit events read so far, counted by User-Agent.
pub struct Tally {
    log: PathBuf,
    offset: u64,
    by_agent: HashMap<String, Requests>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: String,
    #[serde(default)]
    user_agent: String,
    #[serde(default)]
    verb: String,
}

impl Tally {
    pub fn new(log: PathBuf) -> Self {
        Self { log, offset: 0, by_agent: HashMap::new() }
    }

    /// Reads the events written since the last call (whole lines only).
    pub fn refresh(&mut self) -> Result<()> {
        let mut file = std::fs::File::open(&self.log).with_context(|| format!("opening {}", self.log.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else { return Ok(()) };
        for line in bytes[..end].split(|b| *b == b'\n') {
            let Ok(event) = serde_json::from_slice::<Event>(line) else { continue };
            // A watch is recorded when its response starts and again when it ends: count it when
            // it starts, while its client still runs (it may end after the client exited).
            let counted = match event.stage.as_str() {
                "ResponseStarted" => true,
                "ResponseComplete" => event.verb != "watch",
                _ => false,
            };
            if !counted {
                continue;
            }
            let entry = self.by_agent.entry(event.user_agent).or_default();
            entry.total += 1;
            if matches!(event.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection") {
                entry.writes += 1;
            }
        }
        self.offset += end as u64 + 1;
        Ok(())
    }

    /// The requests of the client whose User-Agent ends in `(label)`.
    pub fn of(&self, label: &str) -> Requests {
        let suffix = format!("({label})");
        self.by_agent.iter().filter(|(agent, _)| agent.ends_with(&suffix)).fold(Requests::default(), |sum, (_, r)| {
            Requests { total: sum.total + r.total, writes: sum.writes + r.writes }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_requests_are_counted_by_label_and_a_partial_line_waits() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("bench-audit-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("audit.log");
        let event = |stage: &str, agent: &str, verb: &str| {
            format!("{{\"stage\":\"{stage}\",\"userAgent\":\"{agent}\",\"verb\":\"{verb}\"}}\n")
        };
        let mut text = event("ResponseComplete", "example-operator/0.1.0 (a)", "create");
        text += &event("ResponseStarted", "example-operator/0.1.0 (a)", "watch");
        text += &event("ResponseComplete", "example-operator/0.1.0 (a)", "watch");
        text += &event("ResponseComplete", "peer (b)", "get");
        text += "{\"stage\":\"Resp";
        std::fs::write(&log, &text)?;
        let mut tally = Tally::new(log.clone());
        tally.refresh()?;
        assert_eq!(tally.of("a"), Requests { total: 2, writes: 1 });
        assert_eq!(tally.of("b"), Requests { total: 1, writes: 0 });
        text += "onseComplete\",\"userAgent\":\"peer (b)\",\"verb\":\"patch\"}\n";
        std::fs::write(&log, &text)?;
        tally.refresh()?;
        assert_eq!(tally.of("b"), Requests { total: 2, writes: 1 });
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
