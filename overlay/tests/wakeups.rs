//! How often a node's own timers wake its driver, in the simulator with a
//! driver that wakes late, as a real one does (the engine reads the clock
//! after `epoll_wait` returns). Every wake-up costs a connected host tens of
//! microseconds of CPU with cold caches; a fleet's idle agents pay it all
//! day.

mod netsim;

use std::time::Duration;

use netsim::Net;

/// What one wake-up of the real engine takes to notice the clock.
const WAKE_LATENCY: Duration = Duration::from_micros(80);

/// Runs `span` and counts the timer wake-ups of host `a`.
fn wakeups_over(net: &mut Net, a: usize, span: Duration) -> u64 {
    let before = net.hosts[a].timer_wakeups;
    net.run_for(span);
    net.hosts[a].timer_wakeups - before
}

#[test]
fn a_node_with_an_awake_session_wakes_only_on_the_wireguard_tick_grid() {
    let mut net = Net::new(71);
    net.timer_latency = WAKE_LATENCY;
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    net.ping(a, b, Duration::from_secs(2)).expect("first ping");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.path(a, b), "direct");

    // Traffic every 100 ms keeps the session awake and the path active
    // (keepalives every second), and the once-a-second checks run: all of
    // them fit on the session's 250 ms tick grid.
    let before = (net.hosts[a].timer_wakeups, net.now);
    for _ in 0..40 {
        net.ping(a, b, Duration::from_secs(1)).expect("ping");
        net.run_to_next(Duration::from_millis(100));
    }
    let busy = net.hosts[a].timer_wakeups - before.0;
    let span = net.now - before.1;
    let ticks = span.as_millis() as u64 / 250;
    // Allowed 2 more: the backbone heartbeat (every 5 s here) is not on
    // the grid. Before the grid this node woke about 22 times.
    assert!(busy <= ticks + 2, "{busy} timer wake-ups in {span:?} of traffic: the tick grid has {ticks}");

    // Idle but awake (before the session goes quiet): the same.
    let idle = wakeups_over(&mut net, a, span);
    println!("timer wake-ups: {busy} in {span:?} of traffic, {idle} idle; the tick grid has {ticks}");
    assert!(idle <= ticks + 2, "{idle} timer wake-ups in {span:?} idle: the tick grid has {ticks}");
}

#[test]
fn the_deadline_kept_between_calls_moves_with_a_lookup_and_its_answer() {
    use meshtun_addr::NetworkId;
    use meshtun_proto::Query;
    let mut net = Net::new(73);
    let a = net.add_host(0, None);
    net.run_for(Duration::from_secs(3));
    let now = net.now;
    let idle = net.hosts[a].node.poll_timeout().expect("a registered node has timers");
    assert_eq!(net.hosts[a].node.poll_timeout(), Some(idle), "asked again, the kept deadline");
    // A lookup the backbone has not answered yet retries sooner than the
    // idle node's timers: the deadline kept before it must not hide that.
    let query = Query::Capability { network: NetworkId::PUBLIC, name: "nobody-has-this".into() };
    net.hosts[a].node.query(query, now);
    let waiting = net.hosts[a].node.poll_timeout().expect("a lookup in flight has a retry");
    assert!(waiting < idle, "the retry ({:?} away) comes before the idle timers ({:?} away)", waiting - now, idle - now);
    // Once answered (an empty answer), the retry is gone again.
    net.run_for(Duration::from_millis(50));
    let after = net.hosts[a].node.poll_timeout().expect("still registered");
    assert!(after > waiting, "the answered lookup no longer sets the deadline");
}

#[test]
fn a_conversation_in_both_directions_sends_the_peer_no_path_keepalives_beyond_the_rtt_refresh() {
    let (mut net, a, b) = Net::direct_pair(75);

    // An echo every 20 ms for 30 s: b answers each (auto echo), so data
    // flows both ways and proves the path at both ends.
    let from_a = net.hosts[a].internal;
    let before = net.hosts[b].datagrams_from.get(&from_a).copied().unwrap_or(0);
    let mut echoes = 0u64;
    for _ in 0..1500 {
        net.ping(a, b, Duration::from_secs(1)).expect("ping");
        echoes += 1;
        net.run_to_next(Duration::from_millis(20));
    }
    let datagrams = net.hosts[b].datagrams_from.get(&from_a).copied().unwrap_or(0) - before;
    let beyond_data = datagrams - echoes;
    println!("{datagrams} datagrams from a to b for {echoes} echoes in 30 s: {beyond_data} more");
    // Each end's RTT refresh (every 10 s) is a ping and its pong, and draws
    // a ping back: up to 4 datagrams from a per refresh of either end.
    // A keepalive a second each way was about 60.
    assert!(beyond_data <= 16, "{beyond_data} datagrams besides the echoes in 30 s");
}
