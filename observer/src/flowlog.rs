//! `--flow-log FILE`: flow records as JSON lines, rotated by size (`FILE.1` is the newest
//! rotated file), with include and exclude filters.
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
};

use anyhow::{Context as _, Result};

use crate::{
    filter::{self, Filter},
    flows::FlowRecord,
};

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub max_bytes: u64,
    /// Rotated files kept besides the live one.
    pub max_files: usize,
    /// All must hold (filter semantics); empty: every record.
    pub include: Vec<Filter>,
    /// A record matching any of these is left out.
    pub exclude: Vec<Filter>,
}

pub struct FlowLog {
    cfg: Config,
    out: BufWriter<File>,
    size: u64,
}

/// `FLAG=VALUE` (for example `verdict=dropped`, `namespace=kube-system`) as a filter.
pub fn parse_spec(spec: &str) -> Result<Filter> {
    let (flag, value) = spec
        .split_once('=')
        .with_context(|| format!("{spec:?}: expected FILTER=VALUE, e.g. verdict=dropped"))?;
    Ok(Filter {
        negate: false,
        m: filter::parse(flag, value)?,
    })
}

impl FlowLog {
    pub fn open(cfg: Config) -> Result<Self> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .with_context(|| format!("opening flow log {}", cfg.path.display()))?;
        let size = f.metadata()?.len();
        Ok(Self {
            cfg,
            out: BufWriter::new(f),
            size,
        })
    }

    pub fn wants(&self, r: &FlowRecord) -> bool {
        filter::accepts(&self.cfg.include, r) && !self.cfg.exclude.iter().any(|f| f.m.matches(r))
    }

    pub fn write(&mut self, r: &FlowRecord) -> Result<()> {
        if !self.wants(r) {
            return Ok(());
        }
        let mut line = serde_json::to_vec(r)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.cfg.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(&line)?;
        // One record is one line on disk: readers (and log shippers) never see half of it.
        self.out.flush()?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        self.out.flush()?;
        let name = |i: usize| {
            let mut p = self.cfg.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.cfg.max_files == 0 {
            let _ = std::fs::remove_file(&self.cfg.path);
        } else {
            let _ = std::fs::remove_file(name(self.cfg.max_files));
            for i in (1..self.cfg.max_files).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            std::fs::rename(&self.cfg.path, name(1))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.path)?;
        self.out = BufWriter::new(f);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_filters() {
        let dir = std::env::temp_dir().join(format!("observer-flowlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let mut log = FlowLog::open(Config {
            path: path.clone(),
            max_bytes: 2000,
            max_files: 2,
            include: vec![parse_spec("protocol=TCP").unwrap()],
            exclude: vec![parse_spec("verdict=dropped").unwrap()],
        })
        .unwrap();
        let base: FlowRecord = serde_json::from_str(r#"{"time":"2026-12-03T10:00:00Z","node":"n","event":"new","verdict":"forwarded","direction":"egress","traffic_class":"pod-to-world","ip":{"version":4,"src":"10.0.0.1","dst":"10.0.0.2"},"l4":{"protocol":"TCP","src_port":1,"dst_port":2},"source":{"ip":"10.0.0.1","port":1},"destination":{"ip":"10.0.0.2","port":2},"counters":{"packets_out":0,"bytes_out":0,"packets_in":0,"bytes_in":0},"first_seen":"2026-12-03T10:00:00Z","last_seen":"2026-12-03T10:00:01Z","interface":1}"#).unwrap();
        let mut dropped = base.clone();
        dropped.verdict = "dropped".into();
        let mut udp = base.clone();
        udp.l4.protocol = "UDP".into();
        for _ in 0..30 {
            log.write(&base).unwrap();
            log.write(&dropped).unwrap();
            log.write(&udp).unwrap();
        }
        let lines = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let rotated = [
            path.clone(),
            dir.join("flows.jsonl.1"),
            dir.join("flows.jsonl.2"),
        ];
        let total: usize = rotated.iter().map(|p| lines(p)).sum();
        assert!(rotated.iter().all(|p| p.exists()), "rotated files present");
        assert!(
            !dir.join("flows.jsonl.3").exists(),
            "at most 2 rotated files kept"
        );
        assert!(
            total < 30 && total > 0,
            "oldest records rotated away, {total} kept"
        );
        for p in &rotated {
            assert!(std::fs::metadata(p).unwrap().len() <= 2000);
            for l in std::fs::read_to_string(p).unwrap().lines() {
                let r: FlowRecord = serde_json::from_str(l).unwrap();
                assert_eq!((&*r.l4.protocol, &*r.verdict), ("TCP", "forwarded"));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
