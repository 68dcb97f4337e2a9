//! `meshtun generate-assets --out DIR` (hidden): the man pages and shell
//! completions, generated from the clap definitions so they never drift
//! from the real flags. `packaging/build.sh` runs it before building the
//! packages.
//!
//! Writes `DIR/man/meshtun.1`, `DIR/man/meshtun-SUBCOMMAND.1` for every
//! visible subcommand, and `DIR/completions/{meshtun.bash,_meshtun,meshtun.fish}`.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;
use clap_mangen::Man;

/// Sections of `meshtun(1)` that clap does not know about.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/meshtun/meshtun.toml\fR
Config file of \fBmeshtun up\fR (read if it exists, or the file given with \fB\-\-config\fR).
Every key is optional and documented in the shipped file; flags override it.
Check it with \fBmeshtun config check\fR.
.TP
\fI/etc/meshtun/backbone.toml\fR
Config file of \fBmeshtun backbone\fR; check it with \fBmeshtun config check \-\-backbone\fR.
.TP
\fI/var/lib/meshtun/identity\fR
The node's identity key. The mesh address is derived from it: back it up.
.TP
\fI/var/lib/meshtun/wireguard.key\fR
The WireGuard key (replaceable; the address does not change).
.TP
\fI/run/meshtun/meshtun.sock\fR, \fI/run/meshtun/backbone.sock\fR
Control sockets of the node and the backbone.
.SH ENVIRONMENT
.TP
\fBMESHTUN_LOG_LEVEL\fR, \fBMESHTUN_LOG_FORMAT\fR, \fBMESHTUN_STATE_DIR\fR, \fBMESHTUN_SOCKET\fR
Like \fB\-\-log\-level\fR, \fB\-\-log\-format\fR, \fB\-\-state\-dir\fR and \fB\-\-socket\fR.
Precedence: built\-in default < config file < environment < command line.
.TP
\fBRUST_LOG\fR
A tracing filter that overrides the log level.
.SH "EXIT STATUS"
0 on success, 78 for a config error (systemd does not restart the service then),
2 for a command\-line usage error, 1 for every other error.
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBjournalctl\fR(1); the units \fImeshtun.service\fR and \fImeshtun\-backbone.service\fR.
"#;

pub fn generate(cmd: clap::Command, out: &Path) -> anyhow::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();

    let man_dir = out.join("man");
    fs::create_dir_all(&man_dir).with_context(|| format!("cannot create {}", man_dir.display()))?;
    let top = Man::new(cmd.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    top.render_options_section(&mut page)?;
    top.render_subcommands_section(&mut page)?;
    page.write_all(EXTRA_SECTIONS.as_bytes())?;
    top.render_version_section(&mut page)?;
    write(&man_dir.join(top.get_filename()), &page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        subcommand_pages(sub.clone(), &man_dir)?;
    }

    let completions = out.join("completions");
    fs::create_dir_all(&completions).with_context(|| format!("cannot create {}", completions.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "meshtun", &completions)
            .with_context(|| format!("cannot write the {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

fn subcommand_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        subcommand_pages(sub.clone(), dir)?;
    }
    let man = Man::new(cmd);
    let mut page = Vec::new();
    man.render(&mut page)?;
    write(&dir.join(man.get_filename()), &page)
}

fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}
