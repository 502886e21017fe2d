//! Where the frames come from: the seed corpus, the deterministic sweep over it, the learned
//! flows, and the random phase.
//!
//! Per program, a run first sends every seed as it is (the seeds open the flows the later
//! frames need), then frames derived from what the seeds taught it (replies of backends to
//! full-NAT flows, ICMP errors quoting the NAT and conntrack tuples, follow-up segments), then
//! every seed and derived frame truncated at every length, raw and with lengths and checksums
//! made consistent. That deterministic part takes at most half of the program's frames. The
//! rest is random: a base frame (a seed, a frame of a learned flow, a frame that once produced
//! a new outcome, an ICMP error quoting a random tuple, or random bytes), mostly mutated.
//!
//! "Learning" watches the outputs: a full-NAT forward tells the NAT leg (SNAT address and port,
//! backend), an admitted tc flow its tuple and direction.

use std::collections::HashSet;

use super::{
    check::Program,
    frames::{
        self, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, IpOpts, Layout,
        PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Tcp,
        fix_all,
    },
    mutate::{self, Dictionary, Labels, MAX_FRAME, Rng},
    setup::*,
};

/// A frame of the corpus: its bytes, the interface it arrives on (XDP ingress, or the tc
/// endpoint) and the program it is meant for.
#[derive(Clone, Debug)]
pub struct Seed {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub ifindex: u32,
    pub program: Program,
}

type Endpoint = ([u8; 4], u16);

/// A full-NAT or DSR flow the load balancer forwarded, as seen on both of its legs.
#[derive(Clone, Copy, Debug)]
struct Leg {
    proto: u8,
    client: Endpoint,
    vip: Endpoint,
    client_macs: ([u8; 6], [u8; 6]),
    ingress: u32,
    /// Source and destination of the forwarded packet.
    out_src: Endpoint,
    out_dst: Endpoint,
    /// (ours, the backend's).
    out_macs: ([u8; 6], [u8; 6]),
    /// The interface the backend's replies arrive on.
    reply_ifindex: u32,
    full_nat: bool,
}

/// A flow the tc programs admitted (and track).
#[derive(Clone, Copy, Debug)]
struct TcFlow {
    proto: u8,
    src: Endpoint,
    dst: Endpoint,
    opened_by: Program,
    ifindex: u32,
}

/// A bounded ring of recent items.
#[derive(Clone, Debug)]
struct Ring<T> {
    items: Vec<T>,
    next: usize,
    cap: usize,
}

impl<T: Clone> Ring<T> {
    fn new(cap: usize) -> Self {
        Self {
            items: Vec::new(),
            next: 0,
            cap,
        }
    }

    fn push(&mut self, item: T) {
        if self.items.len() < self.cap {
            self.items.push(item);
        } else {
            self.items[self.next] = item;
            self.next = (self.next + 1) % self.cap;
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<T> {
        (!self.items.is_empty()).then(|| self.items[rng.below(self.items.len())].clone())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    stage: u8,
    item: usize,
    len: usize,
    fixed: bool,
    sent: u64,
}

/// The frame source of one worker, for all programs.
pub struct Gen {
    seeds: Vec<Seed>,
    /// Frames derived from learned flows in the deterministic phase, per program.
    derived: [Vec<Seed>; 3],
    cursor: [Cursor; 3],
    /// Frames per program the deterministic phase may take.
    budget: [u64; 3],
    legs: Ring<Leg>,
    flows: Ring<TcFlow>,
    /// Frames that produced an outcome not seen before, per program.
    interesting: [Ring<(Vec<u8>, u32)>; 3],
    signatures: HashSet<(Program, u64)>,
    dict: Dictionary,
    ifaces: Ifaces,
}

fn index(p: Program) -> usize {
    match p {
        Program::Xdp => 0,
        Program::TcIngress => 1,
        Program::TcEgress => 2,
    }
}

impl Gen {
    /// A generator over the seeds of `ifaces`; `deterministic` says whether this worker runs
    /// the deterministic phase, `budget` how many frames each program gets in all.
    pub fn new(ifaces: Ifaces, dict: Dictionary, deterministic: bool, budget: [u64; 3]) -> Self {
        let mut seeds = xdp_seeds(&ifaces);
        seeds.extend(tc_seeds(&ifaces));
        let mut cursor = [Cursor::default(); 3];
        if !deterministic {
            for c in &mut cursor {
                c.stage = 3;
            }
        }
        Self {
            seeds,
            derived: [Vec::new(), Vec::new(), Vec::new()],
            cursor,
            budget: budget.map(|b| b / 2),
            legs: Ring::new(128),
            flows: Ring::new(128),
            interesting: [Ring::new(256), Ring::new(256), Ring::new(256)],
            signatures: HashSet::new(),
            dict,
            ifaces,
        }
    }

    pub fn seed_count(&self) -> usize {
        self.seeds.len()
    }

    fn seeds_of(&self, p: Program) -> impl Iterator<Item = &Seed> {
        self.seeds.iter().filter(move |s| s.program == p)
    }

    /// Writes the next frame for `program` into `frame`; returns its interface index.
    pub fn next(
        &mut self,
        program: Program,
        rng: &mut Rng,
        frame: &mut Vec<u8>,
        labels: &mut Labels,
    ) -> u32 {
        labels.clear();
        if let Some(ifindex) = self.deterministic(program, frame, labels) {
            return ifindex;
        }
        self.random(program, rng, frame, labels)
    }

    fn deterministic(
        &mut self,
        program: Program,
        frame: &mut Vec<u8>,
        labels: &mut Labels,
    ) -> Option<u32> {
        let p = index(program);
        loop {
            let c = self.cursor[p];
            if c.stage >= 3 || c.sent >= self.budget[p] {
                self.cursor[p].stage = 3;
                return None;
            }
            match c.stage {
                // Every seed as it is.
                0 => {
                    let Some(seed) = self.seeds_of(program).nth(c.item) else {
                        self.derive(program);
                        self.cursor[p] = Cursor {
                            stage: 1,
                            sent: c.sent,
                            ..Cursor::default()
                        };
                        continue;
                    };
                    frame.clear();
                    frame.extend_from_slice(&seed.frame);
                    let ifindex = seed.ifindex;
                    labels.push("seed");
                    labels.push(seed.name);
                    self.cursor[p].item += 1;
                    self.cursor[p].sent += 1;
                    return Some(ifindex);
                }
                // Every derived frame as it is.
                1 => {
                    let Some(seed) = self.derived[p].get(c.item) else {
                        self.cursor[p] = Cursor {
                            stage: 2,
                            len: 1,
                            sent: c.sent,
                            ..Cursor::default()
                        };
                        continue;
                    };
                    frame.clear();
                    frame.extend_from_slice(&seed.frame);
                    labels.push("derived");
                    labels.push(seed.name);
                    self.cursor[p].item += 1;
                    self.cursor[p].sent += 1;
                    return Some(seed.ifindex);
                }
                // Every seed and derived frame cut at every length, raw and made consistent.
                _ => {
                    let total = self.seeds_of(program).count();
                    let seed = if c.item < total {
                        self.seeds_of(program).nth(c.item)
                    } else {
                        self.derived[p].get(c.item - total)
                    };
                    let Some(seed) = seed else {
                        self.cursor[p].stage = 3;
                        continue;
                    };
                    if c.len >= seed.frame.len() {
                        self.cursor[p].item += 1;
                        self.cursor[p].len = 1;
                        self.cursor[p].fixed = false;
                        continue;
                    }
                    frame.clear();
                    frame.extend_from_slice(&seed.frame[..c.len]);
                    let ifindex = seed.ifindex;
                    labels.push("truncate-sweep");
                    labels.push(seed.name);
                    if c.fixed {
                        fix_all(frame);
                        labels.push("fix-all");
                        self.cursor[p].len += 1;
                    }
                    self.cursor[p].fixed = !c.fixed;
                    self.cursor[p].sent += 1;
                    return Some(ifindex);
                }
            }
        }
    }

    /// The derived frames of `program`'s second stage, from what the seeds taught.
    fn derive(&mut self, program: Program) {
        let mut out = Vec::new();
        let mut rng = Rng::new(0xde41_7ed0);
        if program == Program::Xdp {
            for leg in self.legs.items.clone() {
                for (kind, name) in LEG_KIND_NAMES.iter().enumerate() {
                    if let Some((frame, ifindex)) = self.leg_frame(&leg, kind, &mut rng) {
                        out.push(Seed {
                            name,
                            frame,
                            ifindex,
                            program,
                        });
                    }
                }
            }
        } else {
            for flow in self.flows.items.clone() {
                for (kind, name) in FLOW_KIND_NAMES.iter().enumerate() {
                    if let Some((frame, ifindex, p)) =
                        self.flow_frame(&flow, kind, program, &mut rng)
                        && p == program
                    {
                        out.push(Seed {
                            name,
                            frame,
                            ifindex,
                            program,
                        });
                    }
                }
            }
        }
        out.truncate(512);
        self.derived[index(program)] = out;
    }

    fn random(
        &mut self,
        program: Program,
        rng: &mut Rng,
        frame: &mut Vec<u8>,
        labels: &mut Labels,
    ) -> u32 {
        let p = index(program);
        let roll = rng.below(100);
        let mut ifindex = self.default_ifindex(program);
        let mut mutate_it = rng.chance(85);
        if roll < 6 {
            mutate::random_frame(frame, rng, &self.dict);
            labels.push("random-bytes");
            mutate_it = rng.chance(20);
        } else if roll < 14 {
            ifindex = self.random_icmp_error(program, rng, frame);
            labels.push("icmp-error-random-tuple");
        } else if roll < 40 {
            if let Some(ifx) = self.learned_frame(program, rng, frame, labels) {
                ifindex = ifx;
            } else {
                ifindex = self.seed_frame(program, rng, frame, labels);
            }
        } else if roll < 55 && !self.interesting[p].items.is_empty() {
            let (f, ifx) = self.interesting[p].pick(rng).expect("not empty");
            frame.clear();
            frame.extend_from_slice(&f);
            ifindex = ifx;
            labels.push("interesting");
        } else {
            ifindex = self.seed_frame(program, rng, frame, labels);
        }
        if rng.chance(5) {
            // Splice: this frame's head with another seed's tail.
            let other = &self.seeds[rng.below(self.seeds.len())].frame;
            let cut = rng.below(frame.len().max(1));
            let from = rng.below(other.len().max(1));
            frame.truncate(cut);
            frame.extend_from_slice(&other[from..]);
            frame.truncate(MAX_FRAME);
            labels.push("splice");
        }
        if mutate_it {
            mutate::mutate(frame, rng, &self.dict, 4, labels);
        }
        if rng.chance(4) {
            ifindex = self.random_ifindex(program, rng);
            labels.push("other-interface");
        }
        ifindex
    }

    fn default_ifindex(&self, program: Program) -> u32 {
        if program.is_tc() {
            self.ifaces.ep0
        } else {
            self.ifaces.front
        }
    }

    fn random_ifindex(&self, program: Program, rng: &mut Rng) -> u32 {
        let i = self.ifaces;
        if program.is_tc() {
            *rng.pick(&[i.ep0, i.ep1, i.lo, i.front])
        } else {
            *rng.pick(&[i.front, i.back, i.side, i.lo])
        }
    }

    fn seed_frame(
        &self,
        program: Program,
        rng: &mut Rng,
        frame: &mut Vec<u8>,
        labels: &mut Labels,
    ) -> u32 {
        // tc programs see the other direction's seeds too, sometimes.
        let own: Vec<&Seed> = self.seeds_of(program).collect();
        let seed = if !own.is_empty() && (rng.chance(80) || !program.is_tc()) {
            own[rng.below(own.len())]
        } else {
            let tc: Vec<&Seed> = self.seeds.iter().filter(|s| s.program.is_tc()).collect();
            if program.is_tc() && !tc.is_empty() {
                tc[rng.below(tc.len())]
            } else {
                &self.seeds[rng.below(self.seeds.len())]
            }
        };
        frame.clear();
        frame.extend_from_slice(&seed.frame);
        labels.push("seed");
        labels.push(seed.name);
        seed.ifindex
    }

    fn learned_frame(
        &self,
        program: Program,
        rng: &mut Rng,
        frame: &mut Vec<u8>,
        labels: &mut Labels,
    ) -> Option<u32> {
        if program == Program::Xdp {
            let leg = self.legs.pick(rng)?;
            for _ in 0..4 {
                let kind = rng.below(LEG_KINDS);
                if let Some((f, ifindex)) = self.leg_frame(&leg, kind, rng) {
                    *frame = f;
                    labels.push(LEG_KIND_NAMES[kind]);
                    return Some(ifindex);
                }
            }
            None
        } else {
            for _ in 0..6 {
                let flow = self.flows.pick(rng)?;
                let kind = rng.below(FLOW_KINDS);
                if let Some((f, ifindex, p)) = self.flow_frame(&flow, kind, program, rng)
                    && p == program
                {
                    *frame = f;
                    labels.push(FLOW_KIND_NAMES[kind]);
                    return Some(ifindex);
                }
            }
            None
        }
    }

    /// An ICMP error (random type and code) quoting a random or learned tuple.
    fn random_icmp_error(&self, program: Program, rng: &mut Rng, frame: &mut Vec<u8>) -> u32 {
        let proto = if rng.chance(50) { PROTO_TCP } else { PROTO_UDP };
        let endpoint = |rng: &mut Rng| -> Endpoint {
            let addr = if rng.chance(80) {
                *rng.pick(&self.dict.addrs)
            } else {
                let mut a = [198, 18, 0, 0];
                rng.fill(&mut a[2..]);
                a
            };
            let port = if rng.chance(70) {
                *rng.pick(&self.dict.ports)
            } else {
                rng.next_u64() as u16
            };
            (addr, port)
        };
        let (src, dst) = (endpoint(rng), endpoint(rng));
        let l4_bytes = *rng.pick(&[8usize, 8, 20, 4, 0]);
        let q = frames::quote(proto, src, dst, l4_bytes, rng.range(0, 64));
        let types = [
            (3u8, 4u8),
            (3, 3),
            (3, 1),
            (11, 0),
            (12, 0),
            (4, 0),
            (5, 1),
            (3, 13),
        ];
        let (t, code) = *rng.pick(&types);
        let mtu: u16 = *rng.pick(&[0u16, 68, 576, 1280, 1400, 1500]);
        let rest = [0, 0, (mtu >> 8) as u8, mtu as u8];
        let (from, to, macs, ifindex) = if program.is_tc() {
            let to = if rng.chance(50) { ENDPOINT } else { CLIENT };
            (ROUTER_EP, to, (CLIENT_MAC, EP_MAC), self.ifaces.ep0)
        } else if rng.chance(60) {
            (
                ROUTER_BACK,
                LB_BACK,
                (ROUTER_MAC, BACK_MAC),
                self.ifaces.back,
            )
        } else {
            (CLIENT, VIP, (CLIENT_MAC, FRONT_MAC), self.ifaces.front)
        };
        let l2 = frames::eth(macs.0, macs.1, &[], ETH_P_IPV4);
        *frame = frames::icmp_frame(&l2, from, to, (t, code), rest, &q);
        ifindex
    }

    /// One of the frames a learned load-balancer flow makes possible.
    fn leg_frame(&self, leg: &Leg, kind: usize, rng: &mut Rng) -> Option<(Vec<u8>, u32)> {
        let payload: &[u8] = b"fuzz payload 0123456789";
        let tcp_flags = [
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_SYN,
        ];
        let reply_flags = [
            TCP_SYN | TCP_ACK,
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_FIN | TCP_ACK,
            TCP_RST | TCP_ACK,
        ];
        match kind {
            // The client's next packet of the flow.
            0 => {
                let l2 = frames::eth(leg.client_macs.0, leg.client_macs.1, &[], ETH_P_IPV4);
                let frame = if leg.proto == PROTO_TCP {
                    let flags = *rng.pick(&tcp_flags);
                    let mut t = Tcp::new(leg.client, leg.vip, flags);
                    if flags & TCP_PSH != 0 {
                        t.payload = payload;
                    }
                    frames::tcp_frame(&l2, &t, IpOpts::default())
                } else {
                    frames::udp_frame(&l2, leg.client, leg.vip, payload, false, IpOpts::default())
                };
                Some((frame, leg.ingress))
            }
            // The backend's reply (full-NAT only: DSR replies bypass the load balancer).
            1 if leg.full_nat => {
                let l2 = frames::eth(leg.out_macs.1, leg.out_macs.0, &[], ETH_P_IPV4);
                let frame = if leg.proto == PROTO_TCP {
                    let flags = *rng.pick(&reply_flags);
                    let mut t = Tcp::new(leg.out_dst, leg.out_src, flags);
                    if flags & TCP_PSH != 0 {
                        t.payload = payload;
                    }
                    frames::tcp_frame(&l2, &t, IpOpts::default())
                } else {
                    frames::udp_frame(
                        &l2,
                        leg.out_dst,
                        leg.out_src,
                        payload,
                        rng.chance(20),
                        IpOpts::default(),
                    )
                };
                Some((frame, leg.reply_ifindex))
            }
            // An ICMP error about the packet the load balancer sent to the backend.
            2 if leg.full_nat => {
                let l4_bytes = if leg.proto == PROTO_TCP && rng.chance(30) {
                    20
                } else {
                    8
                };
                let q = frames::quote(leg.proto, leg.out_src, leg.out_dst, l4_bytes, 40);
                let types = [(3u8, 4u8), (3, 3), (3, 1), (11, 0)];
                let (t, code) = *rng.pick(&types);
                let rest = if (t, code) == (3, 4) {
                    [0, 0, 0x05, 0x78]
                } else {
                    [0; 4]
                };
                let (from, from_mac) = if rng.chance(50) {
                    (ROUTER_BACK, ROUTER_MAC)
                } else {
                    (leg.out_dst.0, leg.out_macs.1)
                };
                let l2 = frames::eth(from_mac, leg.out_macs.0, &[], ETH_P_IPV4);
                let frame = frames::icmp_frame(&l2, from, leg.out_src.0, (t, code), rest, &q);
                Some((frame, leg.reply_ifindex))
            }
            // An ICMP error from the client's side quoting the VIP's packet to it.
            3 => {
                let q = frames::quote(leg.proto, leg.vip, leg.client, 8, 20);
                let l2 = frames::eth(leg.client_macs.0, leg.client_macs.1, &[], ETH_P_IPV4);
                let frame = frames::icmp_frame(
                    &l2,
                    leg.client.0,
                    leg.vip.0,
                    (3, 4),
                    [0, 0, 0x05, 0x00],
                    &q,
                );
                Some((frame, leg.ingress))
            }
            // A long packet of the flow (fragmentation needed towards the backends).
            4 => {
                let l2 = frames::eth(leg.client_macs.0, leg.client_macs.1, &[], ETH_P_IPV4);
                let big = vec![0x5au8; rng.range(1300, 1460)];
                let frame = if leg.proto == PROTO_TCP {
                    let t = Tcp {
                        payload: &big,
                        ..Tcp::new(leg.client, leg.vip, TCP_ACK | TCP_PSH)
                    };
                    frames::tcp_frame(&l2, &t, IpOpts::default())
                } else {
                    frames::udp_frame(&l2, leg.client, leg.vip, &big, false, IpOpts::default())
                };
                Some((frame, leg.ingress))
            }
            // An ICMP error about the NAT leg whose IP total length ends inside the quote:
            // the quoted ports are in the frame (Ethernet padding), not in the packet.
            5 if leg.full_nat => {
                let q = frames::quote(leg.proto, leg.out_src, leg.out_dst, 8, 40);
                let l2 = frames::eth(ROUTER_MAC, leg.out_macs.0, &[], ETH_P_IPV4);
                let cut = *rng.pick(&[20usize, 22, 24]);
                let mut frame = frames::icmp_frame(
                    &l2,
                    ROUTER_BACK,
                    leg.out_src.0,
                    (3, 4),
                    [0, 0, 5, 0x78],
                    &q[..cut],
                );
                frame.extend_from_slice(&q[cut..]);
                Some((frame, leg.reply_ifindex))
            }
            _ => None,
        }
    }

    /// One of the frames a tracked tc flow makes possible, and the program it goes to.
    fn flow_frame(
        &self,
        flow: &TcFlow,
        kind: usize,
        want: Program,
        rng: &mut Rng,
    ) -> Option<(Vec<u8>, u32, Program)> {
        let other = if flow.opened_by == Program::TcIngress {
            Program::TcEgress
        } else {
            Program::TcIngress
        };
        let l2 = frames::eth(CLIENT_MAC, EP_MAC, &[], ETH_P_IPV4);
        let packet = |src: Endpoint, dst: Endpoint, flags: u8| -> Vec<u8> {
            match flow.proto {
                PROTO_TCP => {
                    let mut t = Tcp::new(src, dst, flags);
                    if flags & TCP_PSH != 0 {
                        t.payload = b"data";
                    }
                    frames::tcp_frame(&l2, &t, IpOpts::default())
                }
                PROTO_UDP => frames::udp_frame(&l2, src, dst, b"dgram", false, IpOpts::default()),
                _ => {
                    // ICMP echo: the identifier stands in for the ports.
                    let t = if src == flow.src { 8 } else { 0 };
                    let id = flow.src.1;
                    frames::icmp_frame(
                        &l2,
                        src.0,
                        dst.0,
                        (t, 0),
                        [(id >> 8) as u8, id as u8, 0, 1],
                        b"ping",
                    )
                }
            }
        };
        let flags = [
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_SYN | TCP_ACK,
        ];
        match kind {
            // The opener's next packet.
            0 if want == flow.opened_by => Some((
                packet(flow.src, flow.dst, *rng.pick(&flags)),
                flow.ifindex,
                flow.opened_by,
            )),
            // The reply, in the other direction.
            1 if want == other => Some((
                packet(flow.dst, flow.src, *rng.pick(&flags)),
                flow.ifindex,
                other,
            )),
            // An ICMP error quoting the flow, in either direction.
            2 if flow.proto != PROTO_ICMP => {
                let (qs, qd, to) = if want == flow.opened_by {
                    // Quotes the reply the opener got: the error comes back to the replier.
                    (flow.dst, flow.src, flow.dst.0)
                } else {
                    (flow.src, flow.dst, flow.src.0)
                };
                let q = frames::quote(flow.proto, qs, qd, 8, 30);
                let types = [(3u8, 3u8), (3, 4), (11, 0), (12, 0)];
                let frame = frames::icmp_frame(&l2, ROUTER_EP, to, *rng.pick(&types), [0; 4], &q);
                Some((frame, flow.ifindex, want))
            }
            _ => None,
        }
    }

    /// Learns from a run: NAT legs from the load balancer's forwards, tracked flows from the
    /// tc programs' admissions, and new outcomes for the interesting corpus.
    pub fn observe(
        &mut self,
        program: Program,
        input: &[u8],
        ifindex: u32,
        output: &[u8],
        retval: u32,
        deltas: &[i64],
    ) {
        let names = program.reason_names();
        let mut signature = u64::from(retval) << 40;
        let mut verdict = None;
        for (i, d) in deltas.iter().enumerate() {
            if *d != 0 {
                signature |= 1 << i;
                if program.is_verdict(i) {
                    verdict = Some(names[i]);
                }
            }
        }
        if output != input {
            signature |= 1 << 39;
        }
        if self.signatures.insert((program, signature)) {
            self.interesting[index(program)].push((input.to_vec(), ifindex));
        }
        let Some(verdict) = verdict else {
            return;
        };
        if program == Program::Xdp {
            self.learn_leg(input, ifindex, output, verdict);
        } else if verdict.starts_with("allow_") && !verdict.ends_with("untracked") {
            self.learn_flow(program, input, ifindex);
        }
    }

    fn learn_leg(&mut self, input: &[u8], ifindex: u32, output: &[u8], verdict: &str) {
        if !matches!(
            verdict,
            "fwd_tx"
                | "fwd_redirect"
                | "pass_fib_no_neigh"
                | "pass_no_tx_port"
                | "pass_frag_needed"
        ) || output.len() != input.len()
        {
            return;
        }
        let (Some(li), Some(lo)) = (Layout::of(input, 1), Layout::of(output, 1)) else {
            return;
        };
        if li.proto != lo.proto
            || !matches!(li.proto, PROTO_TCP | PROTO_UDP)
            || li.l4 + 4 > input.len()
        {
            return;
        }
        let addr = |f: &[u8], off: usize| -> [u8; 4] { f[off..off + 4].try_into().expect("4") };
        let port = |f: &[u8], off: usize| u16::from_be_bytes([f[off], f[off + 1]]);
        let mac = |f: &[u8], off: usize| -> [u8; 6] { f[off..off + 6].try_into().expect("6") };
        let dst = addr(input, li.l3 + 16);
        if dst != VIP {
            return;
        }
        let out_src = (addr(output, lo.l3 + 12), port(output, lo.l4));
        let out_macs = (mac(output, 6), mac(output, 0));
        let reply_ifindex = match out_macs.0 {
            FRONT_MAC => self.ifaces.front,
            BACK_MAC => self.ifaces.back,
            SIDE_MAC => self.ifaces.side,
            // Not rewritten yet (DSR before the FIB answer): replies would come to back.
            _ => self.ifaces.back,
        };
        let client = (addr(input, li.l3 + 12), port(input, li.l4));
        self.legs.push(Leg {
            proto: li.proto,
            client,
            vip: (dst, port(input, li.l4 + 2)),
            client_macs: (mac(input, 6), mac(input, 0)),
            ingress: ifindex,
            out_src,
            out_dst: (addr(output, lo.l3 + 16), port(output, lo.l4 + 2)),
            out_macs,
            reply_ifindex,
            full_nat: out_src != client,
        });
    }

    fn learn_flow(&mut self, program: Program, input: &[u8], ifindex: u32) {
        let Some(l) = Layout::of(input, 1) else {
            return;
        };
        if l.l4 + 8 > input.len() {
            return;
        }
        let addr = |off: usize| -> [u8; 4] { input[off..off + 4].try_into().expect("4") };
        let port = |off: usize| u16::from_be_bytes([input[off], input[off + 1]]);
        let (sport, dport) = match l.proto {
            PROTO_TCP | PROTO_UDP => (port(l.l4), port(l.l4 + 2)),
            PROTO_ICMP => (port(l.l4 + 4), port(l.l4 + 4)),
            _ => return,
        };
        self.flows.push(TcFlow {
            proto: l.proto,
            src: (addr(l.l3 + 12), sport),
            dst: (addr(l.l3 + 16), dport),
            opened_by: program,
            ifindex,
        });
    }
}

const LEG_KINDS: usize = 6;
const LEG_KIND_NAMES: [&str; LEG_KINDS] = [
    "client-follow-up",
    "backend-reply",
    "icmp-error-about-nat-leg",
    "icmp-error-quoting-vip",
    "long-packet-of-flow",
    "icmp-error-quote-past-ip-end",
];
const FLOW_KINDS: usize = 3;
const FLOW_KIND_NAMES: [&str; FLOW_KINDS] = [
    "tracked-follow-up",
    "tracked-reply",
    "icmp-error-about-flow",
];

// ---------------------------------------------------------------------------------------------
// Seeds.
// ---------------------------------------------------------------------------------------------

fn seed(name: &'static str, frame: Vec<u8>, ifindex: u32, program: Program) -> Seed {
    Seed {
        name,
        frame,
        ifindex,
        program,
    }
}

/// Valid frames for `xdp_lb`: every service and mode, non-VIP traffic, tags, options,
/// fragments, ICMP, and a few documented anomalies.
pub fn xdp_seeds(ifaces: &Ifaces) -> Vec<Seed> {
    let front = ifaces.front;
    let back = ifaces.back;
    let x = Program::Xdp;
    let plain = frames::eth(CLIENT_MAC, FRONT_MAC, &[], ETH_P_IPV4);
    let plain2 = frames::eth(CLIENT2_MAC, FRONT_MAC, &[], ETH_P_IPV4);
    let tagged = frames::eth(CLIENT_MAC, FRONT_MAC, &[(ETH_P_8021Q, 100)], ETH_P_IPV4);
    let qinq = frames::eth(
        CLIENT_MAC,
        FRONT_MAC,
        &[(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)],
        ETH_P_IPV4,
    );
    let rr = [7u8, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let tcp_opts = [
        2u8, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    let http = b"GET / HTTP/1.0\r\nHost: fuzz\r\n\r\n";
    let mut out = Vec::new();
    for (k, vport) in VIP_TCP_PORTS.iter().enumerate() {
        let client = (CLIENT, 40000 + 16 * k as u16);
        let vip = (VIP, *vport);
        let t = |flags| Tcp::new(client, vip, flags);
        let none = IpOpts::default();
        out.push(seed(
            "tcp-syn-to-vip",
            frames::tcp_frame(&plain, &t(TCP_SYN), none),
            front,
            x,
        ));
        out.push(seed(
            "tcp-ack-to-vip",
            frames::tcp_frame(&plain, &t(TCP_ACK), none),
            front,
            x,
        ));
        out.push(seed(
            "tcp-data-to-vip",
            frames::tcp_frame(
                &plain,
                &Tcp {
                    payload: http,
                    ..t(TCP_ACK | TCP_PSH)
                },
                none,
            ),
            front,
            x,
        ));
        out.push(seed(
            "tcp-fin-to-vip",
            frames::tcp_frame(&plain, &t(TCP_FIN | TCP_ACK), none),
            front,
            x,
        ));
        out.push(seed(
            "tcp-rst-to-vip",
            frames::tcp_frame(&plain, &t(TCP_RST), none),
            front,
            x,
        ));
        let other = |n: u16, flags| Tcp::new((CLIENT, client.1 + n), vip, flags);
        out.push(seed(
            "tcp-syn-tcp-options",
            frames::tcp_frame(
                &plain,
                &Tcp {
                    options: &tcp_opts,
                    ..other(1, TCP_SYN)
                },
                none,
            ),
            front,
            x,
        ));
        out.push(seed(
            "tcp-syn-ip-options",
            frames::tcp_frame(
                &plain,
                &other(2, TCP_SYN),
                IpOpts {
                    options: &rr,
                    ..none
                },
            ),
            front,
            x,
        ));
        out.push(seed(
            "tcp-syn-vlan",
            frames::tcp_frame(&tagged, &other(3, TCP_SYN), none),
            front,
            x,
        ));
        out.push(seed(
            "tcp-syn-qinq",
            frames::tcp_frame(&qinq, &other(4, TCP_SYN), none),
            front,
            x,
        ));
        out.push(seed(
            "tcp-syn-second-client",
            frames::tcp_frame(
                &plain2,
                &Tcp::new((CLIENT2, client.1 + 5), vip, TCP_SYN),
                none,
            ),
            front,
            x,
        ));
        out.push(seed(
            "tcp-ack-long",
            frames::tcp_frame(
                &plain,
                &Tcp {
                    payload: &[0x5a; 1400],
                    ..t(TCP_ACK | TCP_PSH)
                },
                none,
            ),
            front,
            x,
        ));
    }
    for (k, vport) in VIP_UDP_PORTS.iter().enumerate() {
        let client = (CLIENT, 50000 + 16 * k as u16);
        let vip = (VIP, *vport);
        let none = IpOpts::default();
        out.push(seed(
            "udp-to-vip",
            frames::udp_frame(&plain, client, vip, b"query", false, none),
            front,
            x,
        ));
        out.push(seed(
            "udp-to-vip-no-checksum",
            frames::udp_frame(&plain, (CLIENT, client.1 + 1), vip, b"query", true, none),
            front,
            x,
        ));
        out.push(seed(
            "udp-to-vip-vlan",
            frames::udp_frame(&tagged, (CLIENT, client.1 + 2), vip, b"query", false, none),
            front,
            x,
        ));
        out.push(seed(
            "udp-to-vip-ip-options",
            frames::udp_frame(
                &plain,
                (CLIENT, client.1 + 3),
                vip,
                b"query",
                false,
                IpOpts {
                    options: &rr,
                    ..none
                },
            ),
            front,
            x,
        ));
        out.push(seed(
            "udp-to-vip-long",
            frames::udp_frame(&plain, (CLIENT, client.1 + 4), vip, &[7; 1420], false, none),
            front,
            x,
        ));
    }
    let none = IpOpts::default();
    out.push(seed(
        "icmp-echo-to-vip",
        frames::icmp_frame(&plain, CLIENT, VIP, (8, 0), [0, 1, 0, 1], b"ping"),
        front,
        x,
    ));
    out.push(seed(
        "icmp-echo-to-node",
        frames::icmp_frame(&plain, CLIENT, LB_FRONT, (8, 0), [0, 1, 0, 2], b"ping"),
        front,
        x,
    ));
    out.push(seed(
        "tcp-to-node",
        frames::tcp_frame(
            &plain,
            &Tcp::new((CLIENT, 40999), (LB_FRONT, 22), TCP_SYN),
            none,
        ),
        front,
        x,
    ));
    out.push(seed(
        "udp-elsewhere",
        frames::udp_frame(
            &plain,
            (CLIENT, 40998),
            ([198, 18, 7, 7], 9),
            b"x",
            false,
            none,
        ),
        front,
        x,
    ));
    for (name, dst, more, offset) in [
        ("fragment-first-to-vip", VIP, true, 0u16),
        ("fragment-later-to-vip", VIP, true, 8),
        ("fragment-last-to-vip", VIP, false, 8),
        ("fragment-elsewhere", [198, 18, 7, 7], true, 0),
    ] {
        out.push(seed(
            name,
            frames::udp_frame(
                &plain,
                (CLIENT, 40997),
                (dst, 53),
                &[0xab; 56],
                false,
                IpOpts {
                    more_fragments: more,
                    frag_offset: offset,
                    ..none
                },
            ),
            front,
            x,
        ));
    }
    // A TCP header whose data offset points past the segment, and one below 5 words.
    for (name, offset) in [
        ("tcp-syn-data-offset-past-segment", 0xf0u8),
        ("tcp-syn-data-offset-below-5", 0x40),
    ] {
        let mut f = frames::tcp_frame(&plain, &Tcp::new((CLIENT, 40996), (VIP, 80), TCP_SYN), none);
        f[14 + 20 + 12] = offset;
        frames::fix_l4_checksum(&mut f);
        out.push(seed(name, f, front, x));
    }
    // A UDP length beyond the IP payload.
    let mut f = frames::udp_frame(&plain, (CLIENT, 40995), (VIP, 53), b"query", false, none);
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    out.push(seed("udp-length-past-payload", f, front, x));
    let mut arp = frames::eth(CLIENT_MAC, [0xff; 6], &[], ETH_P_ARP);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2,
    ]);
    out.push(seed("arp", arp, front, x));
    let mut v6 = frames::eth(CLIENT_MAC, FRONT_MAC, &[], ETH_P_IPV6);
    v6.extend_from_slice(&[0x60; 40]);
    out.push(seed("ipv6", v6, front, x));
    // ICMP errors about tuples the load balancer may not know (yet).
    let router = frames::eth(ROUTER_MAC, BACK_MAC, &[], ETH_P_IPV4);
    for (name, proto) in [
        ("icmp-error-unknown-tcp", PROTO_TCP),
        ("icmp-error-unknown-udp", PROTO_UDP),
    ] {
        let q = frames::quote(proto, (LB_BACK, 30001), (BACKENDS[0], BACKEND_PORT), 8, 20);
        out.push(seed(
            name,
            frames::icmp_frame(&router, ROUTER_BACK, LB_BACK, (3, 4), [0, 0, 5, 0x78], &q),
            back,
            x,
        ));
    }
    let q = frames::quote(PROTO_TCP, (VIP, 80), (CLIENT, 40000), 8, 20);
    out.push(seed(
        "icmp-error-quoting-vip",
        frames::icmp_frame(&plain, CLIENT, VIP, (3, 4), [0, 0, 5, 0], &q),
        front,
        x,
    ));
    out
}

/// Valid frames for the tc programs: new flows each rule and default decides, replies and
/// ICMP errors of flows the seeds open, tags, options, fragments, anomalies.
pub fn tc_seeds(ifaces: &Ifaces) -> Vec<Seed> {
    let ep0 = ifaces.ep0;
    let ep1 = ifaces.ep1;
    let ing = Program::TcIngress;
    let eg = Program::TcEgress;
    let l2 = frames::eth(CLIENT_MAC, EP_MAC, &[], ETH_P_IPV4);
    let tagged = frames::eth(CLIENT_MAC, EP_MAC, &[(ETH_P_8021Q, 7)], ETH_P_IPV4);
    let qinq = frames::eth(
        CLIENT_MAC,
        EP_MAC,
        &[(ETH_P_8021AD, 8), (ETH_P_8021Q, 7)],
        ETH_P_IPV4,
    );
    let none = IpOpts::default();
    let tcp = |src, dst, flags| frames::tcp_frame(&l2, &Tcp::new(src, dst, flags), none);
    let web = ((CLIENT, 40000), (ENDPOINT, 8080));
    let out_web = ((ENDPOINT, 50000), (OUTSIDER, 443));
    let mut out = vec![
        seed("tc-web-syn", tcp(web.0, web.1, TCP_SYN), ep0, ing),
        seed("tc-web-ack", tcp(web.0, web.1, TCP_ACK), ep0, ing),
        seed(
            "tc-web-data",
            frames::tcp_frame(
                &l2,
                &Tcp {
                    payload: b"GET /",
                    ..Tcp::new(web.0, web.1, TCP_ACK | TCP_PSH)
                },
                none,
            ),
            ep0,
            ing,
        ),
        seed("tc-web-fin", tcp(web.0, web.1, TCP_FIN | TCP_ACK), ep0, ing),
        seed("tc-web-rst", tcp(web.0, web.1, TCP_RST), ep0, ing),
        seed(
            "tc-telnet-syn",
            tcp((CLIENT, 40001), (ENDPOINT, 23), TCP_SYN),
            ep0,
            ing,
        ),
        seed(
            "tc-ssh-syn",
            tcp((CLIENT, 40002), (ENDPOINT, 22), TCP_SYN),
            ep0,
            ing,
        ),
        seed(
            "tc-outsider-syn",
            tcp((OUTSIDER, 40003), (ENDPOINT, 8080), TCP_SYN),
            ep0,
            ing,
        ),
        seed(
            "tc-dns-query",
            frames::udp_frame(&l2, (CLIENT, 5353), (ENDPOINT, 53), b"query", false, none),
            ep0,
            ing,
        ),
        seed(
            "tc-lab-udp",
            frames::udp_frame(&l2, (LAB, 7000), (ENDPOINT, 9999), b"lab", false, none),
            ep0,
            ing,
        ),
        seed(
            "tc-ping",
            frames::icmp_frame(&l2, CLIENT, ENDPOINT, (8, 0), [0, 9, 0, 1], b"ping"),
            ep0,
            ing,
        ),
        seed(
            "tc-outsider-ping",
            frames::icmp_frame(&l2, OUTSIDER, ENDPOINT, (8, 0), [0, 10, 0, 1], b"ping"),
            ep0,
            ing,
        ),
        seed(
            "tc-web-syn-vlan",
            frames::tcp_frame(&tagged, &Tcp::new((CLIENT, 40004), web.1, TCP_SYN), none),
            ep0,
            ing,
        ),
        seed(
            "tc-web-syn-qinq",
            frames::tcp_frame(&qinq, &Tcp::new((CLIENT, 40005), web.1, TCP_SYN), none),
            ep0,
            ing,
        ),
        seed(
            "tc-web-syn-ip-options",
            frames::tcp_frame(
                &l2,
                &Tcp::new((CLIENT, 40006), web.1, TCP_SYN),
                IpOpts {
                    options: &[148, 4, 0, 0],
                    ..none
                },
            ),
            ep0,
            ing,
        ),
        seed(
            "tc-fragment",
            frames::udp_frame(
                &l2,
                (CLIENT, 5354),
                (ENDPOINT, 53),
                &[1; 64],
                false,
                IpOpts {
                    more_fragments: true,
                    ..none
                },
            ),
            ep0,
            ing,
        ),
        seed(
            "tc-ep1-ssh-syn",
            tcp((CLIENT, 40007), (ENDPOINT1, 22), TCP_SYN),
            ep1,
            ing,
        ),
        seed(
            "tc-ep1-web-syn",
            tcp((CLIENT, 40008), (ENDPOINT1, 8080), TCP_SYN),
            ep1,
            ing,
        ),
        seed(
            "tc-out-web-syn",
            tcp(out_web.0, out_web.1, TCP_SYN),
            ep0,
            eg,
        ),
        seed(
            "tc-out-8443-syn",
            tcp((ENDPOINT, 50001), (OUTSIDER, 8443), TCP_SYN),
            ep0,
            eg,
        ),
        seed(
            "tc-out-smtp-syn",
            tcp((ENDPOINT, 50002), (OUTSIDER, 25), TCP_SYN),
            ep0,
            eg,
        ),
        seed(
            "tc-out-dns",
            frames::udp_frame(&l2, (ENDPOINT, 5000), (OUTSIDER, 53), b"q", false, none),
            ep0,
            eg,
        ),
        seed(
            "tc-web-syn-ack",
            tcp(web.1, web.0, TCP_SYN | TCP_ACK),
            ep0,
            eg,
        ),
        seed(
            "tc-dns-answer",
            frames::udp_frame(&l2, (ENDPOINT, 53), (CLIENT, 5353), b"answer", false, none),
            ep0,
            eg,
        ),
        seed(
            "tc-ping-reply",
            frames::icmp_frame(&l2, ENDPOINT, CLIENT, (0, 0), [0, 9, 0, 1], b"ping"),
            ep0,
            eg,
        ),
        seed(
            "tc-out-web-syn-ack",
            tcp(out_web.1, out_web.0, TCP_SYN | TCP_ACK),
            ep0,
            ing,
        ),
    ];
    let q = frames::quote(PROTO_TCP, out_web.0, out_web.1, 8, 20);
    out.push(seed(
        "tc-icmp-error-about-out-web",
        frames::icmp_frame(&l2, ROUTER_EP, ENDPOINT, (3, 4), [0, 0, 5, 0x78], &q),
        ep0,
        ing,
    ));
    let q = frames::quote(PROTO_TCP, web.0, web.1, 8, 20);
    out.push(seed(
        "tc-icmp-error-about-web",
        frames::icmp_frame(&l2, ENDPOINT, CLIENT, (3, 3), [0; 4], &q),
        ep0,
        eg,
    ));
    let q = frames::quote(PROTO_UDP, (CLIENT, 5353), (ENDPOINT, 53), 8, 5);
    out.push(seed(
        "tc-icmp-error-about-dns",
        frames::icmp_frame(&l2, ENDPOINT, CLIENT, (3, 3), [0; 4], &q),
        ep0,
        eg,
    ));
    let mut f = tcp((CLIENT, 40009), web.1, TCP_SYN);
    f[14 + 20 + 12] = 0xf0;
    frames::fix_l4_checksum(&mut f);
    out.push(seed("tc-syn-data-offset-past-segment", f, ep0, ing));
    let mut f = frames::udp_frame(&l2, (CLIENT, 5355), (ENDPOINT, 53), b"q", false, none);
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&300u16.to_be_bytes());
    out.push(seed("tc-udp-length-past-payload", f, ep0, ing));
    let mut arp = frames::eth(CLIENT_MAC, [0xff; 6], &[], ETH_P_ARP);
    arp.extend_from_slice(&[0; 28]);
    out.push(seed("tc-arp", arp, ep0, ing));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::SlicedPacket;

    fn ifaces() -> Ifaces {
        Ifaces {
            lo: 1,
            front: 2,
            back: 3,
            side: 4,
            ep0: 5,
            ep1: 6,
        }
    }

    #[test]
    fn seeds_are_valid_frames_except_the_deliberate_anomalies() {
        let mut seeds = xdp_seeds(&ifaces());
        seeds.extend(tc_seeds(&ifaces()));
        for s in &seeds {
            let anomaly = s.name.contains("data-offset")
                || s.name.contains("length-past")
                || s.name.contains("qinq")
                || s.name.contains("fragment");
            if !anomaly && s.name != "arp" && s.name != "tc-arp" && s.name != "ipv6" {
                SlicedPacket::from_ethernet(&s.frame)
                    .unwrap_or_else(|e| panic!("seed {} does not parse: {e}", s.name));
            }
            assert!(s.frame.len() <= MAX_FRAME, "{}", s.name);
        }
    }

    #[test]
    fn the_deterministic_phase_ends_and_random_frames_follow() {
        let dict = Dictionary {
            addrs: vec![VIP, CLIENT],
            ports: vec![80],
        };
        let mut g = Gen::new(ifaces(), dict, true, [4000, 4000, 4000]);
        let mut rng = Rng::new(3);
        let mut frame = Vec::new();
        let mut labels = Labels::default();
        for i in 0..6300 {
            let p = Program::ALL[i % 3];
            g.next(p, &mut rng, &mut frame, &mut labels);
            assert!(frame.len() <= MAX_FRAME);
        }
        assert!(g.cursor.iter().all(|c| c.stage == 3));
    }
}
