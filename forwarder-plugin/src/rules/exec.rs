//! Child processes (iptables-restore/-save, ip) run inside a namespace. Each
//! argument is passed as its own argv element and documents go through
//! stdin: no value ever passes through a shell.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::netns::Netns;

use super::error::{Result, RulesError};

/// Finds `name` in `PATH`, then in the sbin directories (which `PATH` often
/// lacks for non-root users or minimal environments).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn require_tool(name: &str) -> Result<PathBuf> {
    find_tool(name).ok_or_else(|| RulesError::ToolMissing {
        program: name.to_owned(),
    })
}

/// One program invocation in a namespace.
pub(crate) struct Run<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub stdin: Option<&'a str>,
    pub env: Vec<(&'static str, String)>,
}

impl<'a> Run<'a> {
    pub fn new(program: &'a Path, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Run {
            program,
            args: args.into_iter().map(Into::into).collect(),
            stdin: None,
            env: Vec::new(),
        }
    }

    pub fn stdin(mut self, text: &'a str) -> Self {
        self.stdin = Some(text);
        self
    }

    pub fn env(mut self, key: &'static str, value: String) -> Self {
        self.env.push((key, value));
        self
    }

    fn display(&self) -> String {
        let name = self
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::iter::once(name)
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs to completion; stdout on success, [`RulesError::Command`] with
    /// stderr otherwise.
    pub fn output(&self, ns: &Netns) -> Result<String> {
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Predictable messages to parse and report.
            .env("LC_ALL", "C");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        ns.enter_in_child(&mut cmd);
        let spawn_err = |source| RulesError::Spawn {
            program: self.program.display().to_string(),
            netns: ns.id(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(text) = self.stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            // A child that exits early closes the pipe; its status says why.
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(RulesError::Command {
                command: self.display(),
                netns: ns.id(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
