//! Attaching `xdp_lb` to interfaces through pinned links (see `crate::bpf::links`).
use std::collections::BTreeMap;

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use datapath_api::Counter;
use tracing::{info, warn};

use crate::error::{Error, Result, program_error};

use super::*;

impl Dataplane {
    /// Attaches the loaded program to one more interface (a configuration reload). The
    /// interfaces already attached are not touched.
    pub fn attach_interface(&mut self, name: &str) -> Result<()> {
        if self.links.contains_key(name) {
            return Ok(());
        }
        let index = interface_index(name)?;
        let config = self.config.clone();
        let program: &mut Xdp = self
            .bpf
            .program_mut(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        let link = attach_or_replace(program, &config, name)?;
        if let Err(e) = self.tx_ports.insert(index, index, None, 0) {
            // No partial update: without its devmap entry the interface cannot be a redirect
            // target, so undo the attachment.
            let _ = std::fs::remove_file(link_pin_path(&self.config.pin_root, name));
            drop(link);
            return Err(Error::io(
                format!("add {name} to LB_TX_PORTS"),
                std::io::Error::other(e.to_string()),
            ));
        }
        self.links.insert(name.to_string(), link);
        self.config.interfaces.push(name.to_string());
        Ok(())
    }

    /// Detaches the program from `name` (a configuration reload) and removes its pin.
    pub fn detach_interface(&mut self, name: &str) -> Result<()> {
        let Some((link, _)) = self.links.remove(name) else {
            return Ok(());
        };
        if let Ok(index) = interface_index(name) {
            let _ = self.tx_ports.remove(index);
        }
        // The pin and our descriptor are the link's last references: removing both detaches.
        let pin = link_pin_path(&self.config.pin_root, name);
        std::fs::remove_file(&pin)
            .map_err(|e| Error::io(format!("remove pinned link {}", pin.display()), e))?;
        drop(link);
        self.config.interfaces.retain(|i| i != name);
        Ok(())
    }

    /// Each attached interface's link pin.
    pub fn link_pins(&self) -> Vec<(String, std::path::PathBuf)> {
        self.links
            .keys()
            .map(|name| (name.clone(), link_pin_path(&self.config.pin_root, name)))
            .collect()
    }

    /// Invalidates every cached FIB answer at once (`LB_FIB_GEN`, see
    /// `FlowEntry::fib_generation`): the next packet of each flow looks its next hop up again.
    /// Answers the new generation.
    pub fn bump_fib_generation(&mut self) -> Result<u32> {
        let next = self.fib_generation()?.wrapping_add(1);
        self.fib_generation
            .set(0, next, 0)
            .map_err(|e| Error::io("write LB_FIB_GEN", std::io::Error::other(e.to_string())))?;
        Ok(next)
    }

    /// The FIB cache's generation.
    pub fn fib_generation(&self) -> Result<u32> {
        self.fib_generation
            .get(&0, 0)
            .map_err(|e| Error::io("read LB_FIB_GEN", std::io::Error::other(e.to_string())))
    }

    /// Attached interfaces and how.
    pub fn interfaces(&self) -> Vec<(String, AttachedMode)> {
        self.links
            .iter()
            .map(|(name, (_, mode))| (name.clone(), *mode))
            .collect()
    }

    /// Frames and bytes each attached interface received (summed over CPUs), by name. An
    /// interface whose ifindex is `MAX_IFINDEX` or more shares the overflow counter and is
    /// left out.
    pub fn interface_stats(&self) -> Result<Vec<(String, Counter)>> {
        let mut out = Vec::new();
        for name in self.links.keys() {
            // The daemon runs in the interfaces' namespace.
            let Ok(index) = interface_index(name) else {
                continue;
            };
            if index >= bpf_common::defaults::MAX_IFINDEX {
                continue;
            }
            out.push((name.clone(), sum_counter(&self.interface_stats, index)?));
        }
        Ok(out)
    }

    /// Kernel id of the loaded `xdp_lb` program and of each interface's link.
    pub fn program_and_link_ids(&self) -> Result<(u32, BTreeMap<String, u32>)> {
        let program: &Xdp = self
            .bpf
            .program(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        let info = program
            .info()
            .map_err(program_error("read xdp_lb's program info"))?;
        let mut links = BTreeMap::new();
        for name in self.links.keys() {
            let pin = link_pin_path(&self.config.pin_root, name);
            if let Ok(li) = PinnedLink::from_pin(&pin).and_then(|l| FdLink::from(l).info()) {
                links.insert(name.clone(), li.id());
            }
        }
        Ok((info.id(), links))
    }

    /// The kernel's view of the `xdp_lb` program: run count and run time (while BPF stats are
    /// enabled).
    pub fn program_info(&self) -> Result<aya::programs::ProgramInfo> {
        let program: &Xdp = self
            .bpf
            .program(PROGRAM_LB)
            .ok_or_else(|| Error::InvalidArgument(format!("program {PROGRAM_LB} missing")))?
            .try_into()
            .map_err(program_error("program xdp_lb is not XDP"))?;
        program
            .info()
            .map_err(program_error("read xdp_lb's program info"))
    }
}

/// Attaches `program` to `interface` through a pinned bpf_link, or, when a link from a previous
/// run is pinned, swaps the program inside it atomically (`bpf_link_update`) so no packet ever
/// misses the program. See [`crate::bpf::links`].
pub(super) fn attach_or_replace(
    program: &mut Xdp,
    config: &DataplaneConfig,
    interface: &str,
) -> Result<(PinnedLink, AttachedMode)> {
    let pin_path = link_pin_path(&config.pin_root, interface);
    let what = format!("{PROGRAM_LB} on {interface}");
    let program = std::cell::RefCell::new(program);
    let replace = |fd_link: FdLink| -> Result<AttachedMode> {
        let mut program = program.borrow_mut();
        let xdp_link = XdpLink::try_from(fd_link).map_err(|e| {
            Error::io(
                format!("pinned link {} is not an XDP link", pin_path.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        let link_id = program
            .attach_to_link(xdp_link)
            .map_err(program_error(format!("replace the program on {interface}")))?;
        // The pin holds the link; our handle of it can go.
        drop(
            program
                .take_link(link_id)
                .map_err(program_error("take the updated link"))?,
        );
        Ok(AttachedMode::Adopted)
    };
    let attach = || -> Result<(FdLink, AttachedMode)> {
        let mut program = program.borrow_mut();
        let modes: &[XdpMode] = match config.xdp_mode {
            XdpAttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttachMode::Native => &[XdpMode::Driver],
            XdpAttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last_error = None;
        for mode in modes {
            match program.attach(interface, *mode) {
                Ok(link_id) => {
                    if *mode == XdpMode::Skb && config.xdp_mode == XdpAttachMode::Auto {
                        warn!(
                            interface,
                            "native XDP unavailable, attached in generic (skb) mode: slower"
                        );
                    }
                    let link = program
                        .take_link(link_id)
                        .map_err(program_error("take the new link"))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| {
                        Error::io(
                            format!(
                                "XDP on {interface} was attached through netlink, which cannot \
                                 be pinned"
                            ),
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                    info!(interface, ?mode, "attached xdp_lb");
                    let attached = if *mode == XdpMode::Skb {
                        AttachedMode::Generic
                    } else {
                        AttachedMode::Native
                    };
                    return Ok((fd_link, attached));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(program_error(format!("attach xdp_lb to {interface}"))(
            last_error.unwrap_or(aya::programs::ProgramError::NotLoaded),
        ))
    };
    let (pinned, mode, _) = crate::bpf::links::adopt_or_attach(&pin_path, &what, replace, attach)?;
    Ok((pinned, mode))
}
