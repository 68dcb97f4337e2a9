//! Several backbones in the simulator: an empty answer from one backbone
//! (restarted, or never told about a node) must not make a lookup fail,
//! set queries merge what every backbone knows, and "not found" is only
//! believed when the backbones that answer agree.

mod netsim;

use std::time::Duration;

use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_overlay::{Answer, Found};
use meshtun_proto::Query;
use netsim::{Net, BACKBONE2};

fn hostname(name: &str) -> Query {
    Query::Hostname { network: NetworkId::PUBLIC, name: name.into() }
}

fn cap(name: &str) -> Query {
    Query::Capability { network: NetworkId::PUBLIC, name: name.into() }
}

fn found(answer: Option<Answer>) -> Vec<Found> {
    match answer {
        Some(Answer::Query { found, error: None, .. }) => found,
        other => panic!("expected a successful query answer, got {other:?}"),
    }
}

fn failure(answer: Option<Answer>) -> String {
    match answer {
        Some(Answer::Query { error: Some(error), found, .. }) if found.is_empty() => error,
        other => panic!("expected a failed query answer, got {other:?}"),
    }
}

#[test]
fn a_backbone_restarted_empty_does_not_make_lookups_by_name_or_address_fail() {
    let mut net = Net::new(41);
    net.heartbeat = Duration::from_secs(30); // nobody re-registers during the test on its own
    net.add_second_backbone();
    let c = net.add_host(0, None);
    let papers = net.add_host(1, None);
    net.set_tags(papers, Some("papers"), &[], &[]);
    net.run_for(Duration::from_secs(1));
    // The first backbone crashes and comes back empty.
    net.backbone = Directory::new(DirectoryConfig::default());
    // The asker's first lookup there is refused (it is not registered any
    // more), which makes it re-register; the other backbone answers.
    assert_eq!(found(net.query(c, hostname("papers"), Duration::from_secs(2))).len(), 1);
    net.run_for(Duration::from_secs(6)); // past the answer cache
    let (c_addr, papers_addr) = (net.hosts[c].node.mesh_addr(), net.hosts[papers].node.mesh_addr());
    assert!(net.backbone.get(&c_addr).is_some(), "the asker registered again");
    assert!(net.backbone.get(&papers_addr).is_none(), "the restarted backbone does not know the target yet");
    // It answers "not found" first (it is asked first); the other one's
    // record still wins.
    let by_name = found(net.query(c, hostname("papers"), Duration::from_secs(2)));
    assert_eq!(by_name.first().map(|f| f.ipv6), Some(net.mesh_ip(papers)));
    let by_addr = found(net.query(c, Query::Address(papers_addr), Duration::from_secs(2)));
    assert_eq!(by_addr.first().map(|f| f.mesh_addr), Some(papers_addr));
    assert!(net.hosts[c].node.stats().lookups_failed == 0, "no lookup failed");
    assert!(net.ping(c, papers, Duration::from_secs(2)).is_some(), "a session to the node comes up");
}

#[test]
fn a_node_known_to_only_one_backbone_is_found_and_not_negatively_cached() {
    let mut net = Net::new(42);
    net.add_second_backbone();
    let c = net.add_host(0, None);
    // Registered with the second backbone only: the first, asked first,
    // never heard of it.
    let papers = net.add_host_with(1, None, |config| config.backbones = vec![BACKBONE2]);
    net.set_tags(papers, Some("papers"), &[], &[]);
    net.run_for(Duration::from_secs(1));
    for _ in 0..3 {
        let f = found(net.query(c, hostname("papers"), Duration::from_secs(2)));
        assert_eq!(f.first().map(|f| f.ipv6), Some(net.mesh_ip(papers)));
        net.run_for(Duration::from_secs(6));
    }
    assert_eq!(net.hosts[c].node.stats().lookups_failed, 0);
    assert!(net.ping(c, papers, Duration::from_secs(2)).is_some());
}

#[test]
fn a_capability_query_returns_the_union_of_what_every_backbone_knows() {
    let mut net = Net::new(43);
    net.add_second_backbone();
    let c = net.add_host(0, None);
    let papers = net.add_host_with(1, None, |config| config.backbones = vec![netsim::BACKBONE]);
    let news = net.add_host_with(2, None, |config| config.backbones = vec![BACKBONE2]);
    let both = net.add_host(3, None);
    net.set_tags(papers, Some("papers"), &["summarise"], &[]);
    net.set_tags(news, Some("news"), &["summarise"], &[]);
    net.set_tags(both, Some("both"), &["summarise"], &[]);
    net.run_for(Duration::from_secs(1));
    let started = net.now;
    let mut got: Vec<_> = found(net.query(c, cap("summarise"), Duration::from_secs(2))).into_iter().map(|f| f.ipv6).collect();
    let took = net.now - started;
    got.sort();
    let mut want = vec![net.mesh_ip(papers), net.mesh_ip(news), net.mesh_ip(both)];
    want.sort();
    assert_eq!(got, want, "each member once, whichever backbone knew it");
    // Both backbones answered, so the query did not wait for the window.
    assert!(took < Duration::from_millis(100), "took {took:?}");
}

#[test]
fn a_capability_query_finishes_a_short_window_after_the_first_answer_when_a_backbone_is_silent() {
    let mut net = Net::new(44);
    net.add_second_backbone();
    let c = net.add_host(0, None);
    let papers = net.add_host(1, None);
    net.set_tags(papers, Some("papers"), &["summarise"], &[]);
    net.run_for(Duration::from_secs(1));
    net.extra[0].up = false; // still "registered" as far as the node knows
    let started = net.now;
    let f = found(net.query(c, cap("summarise"), Duration::from_secs(3)));
    let took = net.now - started;
    assert_eq!(f.first().map(|f| f.ipv6), Some(net.mesh_ip(papers)));
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(400), "took {took:?}");
}

#[test]
fn when_every_backbone_says_not_found_the_lookup_fails_at_once_and_is_remembered() {
    let mut net = Net::new(45);
    net.add_second_backbone();
    let c = net.add_host(0, None);
    net.run_for(Duration::from_secs(1));
    let nobody = netsim::identity(3).mesh_addr(NetworkId::PUBLIC);
    let started = net.now;
    let error = failure(net.query(c, Query::Address(nobody), Duration::from_secs(5)));
    assert!(error.starts_with("not registered"), "{error}");
    assert!(net.now - started < Duration::from_millis(100), "took {:?}", net.now - started);
    let error = failure(net.query(c, hostname("nobody"), Duration::from_secs(5)));
    assert!(error.starts_with("not registered"), "{error}");
    // The negative answer is cached: asked again, it comes back without a
    // single simulated millisecond passing.
    let lookups = net.hosts[c].node.stats().lookups_sent;
    let again = net.query(c, hostname("nobody"), Duration::ZERO);
    assert!(matches!(again, Some(Answer::Query { ref found, .. }) if found.is_empty()), "{again:?}");
    assert_eq!(net.hosts[c].node.stats().lookups_sent, lookups);
}

#[test]
fn not_found_from_one_backbone_and_silence_from_the_other_fails_at_the_retry_deadline() {
    let mut net = Net::new(46);
    net.add_second_backbone();
    let c = net.add_host(0, None);
    let papers = net.add_host_with(1, None, |config| config.backbones = vec![BACKBONE2]);
    net.set_tags(papers, Some("papers"), &[], &[]);
    net.run_for(Duration::from_secs(1));
    net.extra[0].up = false; // the only backbone that knows "papers" dies
    let started = net.now;
    let error = failure(net.query(c, hostname("papers"), Duration::from_secs(20)));
    let took = net.now - started;
    assert!(error.starts_with("not registered"), "{error}");
    // One request timeout (1 s), not four attempts with backoff (15 s).
    assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(1100), "took {took:?}");
}
