//! `mtls-agent policy`: prints the PeerAuthentications the observed traffic proves safe, as YAML
//! for `kubectl apply -f -` (see `policy::generate` for the rules).
use std::{io::Write as _, time::Duration};

use super::PolicyArgs;
use crate::policy::generate;

pub fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    let source = args.source.open()?;
    let report = source.report(
        &args.namespace,
        args.workload.as_deref(),
        args.window.map(Duration::from),
    )?;
    let yaml = generate::plan(&report).to_yaml();
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(yaml.as_bytes())?;
    Ok(())
}
