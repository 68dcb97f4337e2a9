//! Pictures of the mesh: Graphviz DOT (`meshtun status --graph`), and an
//! SVG / self-contained HTML page the backbone serves on its metrics port.
//! Built from the same JSON `meshtun status` prints, so a node's view and
//! a backbone's view render the same way.

use std::fmt::Write as _;

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// The node drawing the picture.
    Me,
    Peer,
    Backbone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeKind {
    Direct,
    Relay,
    /// A peer with no confirmed path yet.
    NoPath,
    /// Two nodes a backbone introduced; it cannot see whether they went direct.
    Introduced,
    /// A node and a backbone it registers with.
    Backbone,
}

#[derive(Clone, Debug)]
pub struct GraphNode {
    pub id: String,
    pub label: String,
    pub kind: NodeKind,
}

#[derive(Clone, Debug)]
pub struct GraphEdge {
    pub a: String,
    pub b: String,
    pub kind: EdgeKind,
    pub label: String,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub title: String,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

fn text(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

fn node_label(address: &str, hostname: Option<&str>) -> String {
    match hostname {
        Some(h) => format!("{h}\n{address}"),
        None => address.to_string(),
    }
}

/// The mesh as a node sees it, from its `meshtun status --json` data.
pub fn from_node_status(status: &Value) -> Graph {
    let me = text(&status["address"]).unwrap_or("this node").to_string();
    let hostname = text(&status["hostname"]);
    let mut g = Graph {
        title: format!("meshtun mesh as seen by {}", hostname.map(|h| format!("{h} ({me})")).unwrap_or_else(|| me.clone())),
        ..Graph::default()
    };
    g.nodes.push(GraphNode { id: me.clone(), label: node_label(&me, hostname), kind: NodeKind::Me });
    for b in status["backbones"].as_array().into_iter().flatten() {
        let Some(addr) = text(&b["address"]) else { continue };
        let id = format!("backbone {addr}");
        g.nodes.push(GraphNode { id: id.clone(), label: format!("backbone\n{addr}"), kind: NodeKind::Backbone });
        g.edges.push(GraphEdge { a: me.clone(), b: id, kind: EdgeKind::Backbone, label: text(&b["state"]).unwrap_or("").to_string() });
    }
    for p in status["peers"].as_array().into_iter().flatten() {
        let Some(addr) = text(&p["address"]) else { continue };
        g.nodes.push(GraphNode { id: addr.to_string(), label: node_label(addr, text(&p["hostname"])), kind: NodeKind::Peer });
        let endpoint = text(&p["endpoint"]).unwrap_or("");
        let (kind, label) = match text(&p["path"]) {
            Some("direct") => {
                let rtt = p["rtt_ms"].as_f64().map(|r| format!(" {r:.1} ms")).unwrap_or_default();
                (EdgeKind::Direct, format!("direct{rtt}\n{endpoint}"))
            }
            Some("relay") => {
                let why = text(&p["relay_reason"]).map(|w| format!("\n({w})")).unwrap_or_default();
                (EdgeKind::Relay, format!("relay via {endpoint}{why}"))
            }
            _ => (EdgeKind::NoPath, "no path yet".to_string()),
        };
        g.edges.push(GraphEdge { a: me.clone(), b: addr.to_string(), kind, label });
    }
    g
}

/// The mesh as a backbone knows it, from its status data: every live
/// record, the pairs it introduced and the pairs it relays for.
pub fn from_backbone_status(status: &Value) -> Graph {
    let listen: Vec<String> = status["listen"].as_array().into_iter().flatten().filter_map(|l| l.as_str().map(str::to_string)).collect();
    let me = format!("backbone {}", listen.first().map(String::as_str).unwrap_or(""));
    let mut g = Graph { title: format!("meshtun mesh as known to {me}"), ..Graph::default() };
    g.nodes.push(GraphNode { id: me.clone(), label: format!("backbone\n{}", listen.join(", ")), kind: NodeKind::Backbone });
    for r in status["records"].as_array().into_iter().flatten() {
        let Some(addr) = text(&r["address"]) else { continue };
        g.nodes.push(GraphNode { id: addr.to_string(), label: node_label(addr, text(&r["hostname"])), kind: NodeKind::Peer });
        let observed = text(&r["observed"]).unwrap_or("");
        g.edges.push(GraphEdge { a: addr.to_string(), b: me.clone(), kind: EdgeKind::Backbone, label: observed.to_string() });
    }
    for pair in status["pairs"].as_array().into_iter().flatten() {
        let (Some(a), Some(b)) = (text(&pair["a"]), text(&pair["b"])) else { continue };
        if !g.nodes.iter().any(|n| n.id == a) || !g.nodes.iter().any(|n| n.id == b) {
            continue;
        }
        let (kind, label) = match text(&pair["path"]) {
            Some("relay") => (EdgeKind::Relay, format!("relay {}", human_bytes(pair["relayed_bytes"].as_u64().unwrap_or(0)))),
            _ => (EdgeKind::Introduced, "introduced".to_string()),
        };
        g.edges.push(GraphEdge { a: a.to_string(), b: b.to_string(), kind, label });
    }
    g
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A DOT string literal.
fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Graphviz DOT (undirected); render with `dot -Tsvg`.
pub fn to_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph meshtun {{");
    let _ = writeln!(out, "  graph [label={}, labelloc=t, fontname=\"Helvetica\", overlap=false];", dot_quote(&g.title));
    let _ = writeln!(out, "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f4f6f8\", fontname=\"Helvetica\"];");
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10];");
    for n in &g.nodes {
        let attrs = match n.kind {
            NodeKind::Me => ", penwidth=2, fillcolor=\"#dbe9ff\"",
            NodeKind::Peer => "",
            NodeKind::Backbone => ", shape=cylinder, fillcolor=\"#eeeeee\"",
        };
        let _ = writeln!(out, "  {} [label={}{attrs}];", dot_quote(&n.id), dot_quote(&n.label));
    }
    for e in &g.edges {
        let attrs = match e.kind {
            EdgeKind::Direct => "color=\"#2e7d32\", penwidth=2",
            EdgeKind::Relay => "color=\"#ef6c00\", style=dashed, penwidth=2",
            EdgeKind::NoPath => "color=\"#9e9e9e\", style=dotted",
            EdgeKind::Introduced => "color=\"#607d8b\"",
            EdgeKind::Backbone => "color=\"#b0bec5\", style=dotted",
        };
        let _ = writeln!(out, "  {} -- {} [label={}, {attrs}];", dot_quote(&e.a), dot_quote(&e.b), dot_quote(&e.label));
    }
    out.push_str("}\n");
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A standalone SVG: the drawing node (or backbone) in the middle, the
/// others on a circle around it.
pub fn to_svg(g: &Graph) -> String {
    let center_id = g.nodes.iter().find(|n| n.kind == NodeKind::Me).or_else(|| g.nodes.first()).map(|n| n.id.clone());
    let ring: Vec<&GraphNode> = g.nodes.iter().filter(|n| Some(&n.id) != center_id.as_ref()).collect();
    let radius = (60.0 * ring.len() as f64 / std::f64::consts::PI).max(220.0);
    let (w, h) = (2.0 * radius + 420.0, 2.0 * radius + 260.0);
    let (cx, cy) = (w / 2.0, h / 2.0 + 20.0);
    let mut pos: Vec<(&str, f64, f64)> = Vec::new();
    if let Some(c) = &center_id {
        pos.push((c.as_str(), cx, cy));
    }
    for (i, n) in ring.iter().enumerate() {
        let angle = -std::f64::consts::FRAC_PI_2 + 2.0 * std::f64::consts::PI * i as f64 / ring.len().max(1) as f64;
        pos.push((n.id.as_str(), cx + radius * angle.cos(), cy + radius * angle.sin()));
    }
    let at = |id: &str| pos.iter().find(|(p, _, _)| *p == id).map(|(_, x, y)| (*x, *y));
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" font-family=\"Helvetica, Arial, sans-serif\">\
         <title>{}</title><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{:.0}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">{}</text>",
        xml(&g.title),
        w / 2.0,
        xml(&g.title)
    );
    for e in &g.edges {
        let (Some((x1, y1)), Some((x2, y2))) = (at(&e.a), at(&e.b)) else { continue };
        let style = match e.kind {
            EdgeKind::Direct => "stroke=\"#2e7d32\" stroke-width=\"2.5\"",
            EdgeKind::Relay => "stroke=\"#ef6c00\" stroke-width=\"2.5\" stroke-dasharray=\"8 5\"",
            EdgeKind::NoPath => "stroke=\"#9e9e9e\" stroke-dasharray=\"2 4\"",
            EdgeKind::Introduced => "stroke=\"#607d8b\" stroke-width=\"1.5\"",
            EdgeKind::Backbone => "stroke=\"#b0bec5\" stroke-dasharray=\"2 4\"",
        };
        let touches_center = center_id.as_deref().is_some_and(|c| c == e.a || c == e.b);
        let (mut mx, mut my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        if touches_center {
            let _ = write!(out, "<line class=\"edge\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" {style}/>");
        } else {
            // Between two nodes on the ring: bow outwards, away from the
            // centre's spokes (straight through the middle for opposite nodes).
            let (mut dx, mut dy) = (mx - cx, my - cy);
            let len = (dx * dx + dy * dy).sqrt();
            let bow = if len < radius * 0.2 {
                let (px, py) = (y1 - y2, x2 - x1);
                let plen = (px * px + py * py).sqrt().max(1.0);
                (dx, dy) = (px / plen, py / plen);
                radius * 1.6
            } else {
                (dx, dy) = (dx / len, dy / len);
                radius * 0.9
            };
            let (qx, qy) = (mx + dx * bow, my + dy * bow);
            let _ = write!(out, "<path class=\"edge\" d=\"M{x1:.1},{y1:.1} Q{qx:.1},{qy:.1} {x2:.1},{y2:.1}\" fill=\"none\" {style}/>");
            (mx, my) = (0.25 * x1 + 0.5 * qx + 0.25 * x2, 0.25 * y1 + 0.5 * qy + 0.25 * y2);
        }
        for (i, line) in e.label.lines().enumerate() {
            let _ = write!(
                out,
                "<text x=\"{mx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#37474f\" stroke=\"white\" stroke-width=\"3\" paint-order=\"stroke\">{}</text>",
                my - 4.0 + 13.0 * i as f64,
                xml(line)
            );
        }
    }
    for n in &g.nodes {
        let Some((x, y)) = at(&n.id) else { continue };
        let lines: Vec<&str> = n.label.lines().collect();
        let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(4) as f64 * 7.4 + 20.0;
        let height = 16.0 * lines.len() as f64 + 12.0;
        let (fill, stroke) = match n.kind {
            NodeKind::Me => ("#dbe9ff", "stroke=\"#1565c0\" stroke-width=\"2\""),
            NodeKind::Peer => ("#f4f6f8", "stroke=\"#546e7a\""),
            NodeKind::Backbone => ("#eeeeee", "stroke=\"#424242\" stroke-width=\"1.5\""),
        };
        let _ = write!(
            out,
            "<g class=\"node\"><title>{}</title><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{height:.1}\" rx=\"8\" fill=\"{fill}\" {stroke}/>",
            xml(&n.id),
            x - width / 2.0,
            y - height / 2.0
        );
        for (i, line) in lines.iter().enumerate() {
            let _ = write!(
                out,
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
                y - height / 2.0 + 20.0 + 16.0 * i as f64,
                xml(line)
            );
        }
        out.push_str("</g>");
    }
    let legend = [
        ("#2e7d32", "", "direct"),
        ("#ef6c00", " stroke-dasharray=\"8 5\"", "relayed"),
        ("#607d8b", "", "introduced (path unknown here)"),
        ("#b0bec5", " stroke-dasharray=\"2 4\"", "registered with backbone"),
    ];
    for (i, (color, dash, what)) in legend.iter().enumerate() {
        let y = h - 20.0 - 16.0 * (legend.len() - 1 - i) as f64;
        let _ = write!(
            out,
            "<line x1=\"12\" y1=\"{:.0}\" x2=\"40\" y2=\"{:.0}\" stroke=\"{color}\" stroke-width=\"2.5\"{dash}/><text x=\"46\" y=\"{:.0}\" font-size=\"11\">{what}</text>",
            y - 4.0,
            y - 4.0,
            y
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A small self-contained HTML page: the SVG and a table of the records.
pub fn backbone_html(status: &Value) -> String {
    let g = from_backbone_status(status);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>{}</title><style>body{{font-family:Helvetica,Arial,sans-serif;margin:1.5em;color:#263238}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #cfd8dc;padding:.25em .6em;text-align:left;font-size:13px}}\
         th{{background:#eceff1}}</style></head><body><h1>{}</h1>",
        xml(&g.title),
        xml(&g.title)
    );
    out.push_str(&to_svg(&g));
    let st = &status["stats"];
    let _ = write!(
        out,
        "<p>{} record(s); relayed {} in {} packet(s). Refreshes every 10 s. \
         Also: <a href=\"/mesh.svg\">/mesh.svg</a>, <a href=\"/mesh.dot\">/mesh.dot</a>, <a href=\"/metrics\">/metrics</a>.</p>\
         <table><tr><th>address</th><th>hostname</th><th>seen from</th><th>endpoints</th><th>expires in</th></tr>",
        status["records"].as_array().map_or(0, Vec::len),
        human_bytes(st["relayed_bytes"].as_u64().unwrap_or(0)),
        st["relayed_packets"].as_u64().unwrap_or(0)
    );
    for r in status["records"].as_array().into_iter().flatten() {
        let endpoints: Vec<String> = r["endpoints"].as_array().into_iter().flatten().filter_map(|e| e.as_str().map(str::to_string)).collect();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0} s</td></tr>",
            xml(text(&r["address"]).unwrap_or("")),
            xml(text(&r["hostname"]).unwrap_or("")),
            xml(text(&r["observed"]).unwrap_or("")),
            xml(&endpoints.join(", ")),
            r["expires_in_secs"].as_f64().unwrap_or(0.0)
        );
    }
    out.push_str("</table></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node_status() -> Value {
        json!({
            "address": "0:AAAA.0000.0001", "hostname": "alpha",
            "backbones": [{"address": "198.18.0.1:7400", "state": "registered"}],
            "peers": [
                {"address": "0:BBBB.0000.0002", "hostname": "be\"ta", "path": "direct", "endpoint": "198.18.0.3:51820", "rtt_ms": 0.42},
                {"address": "0:CCCC.0000.0003", "hostname": null, "path": "relay", "endpoint": "198.18.0.1:7400", "relay_reason": "no probe answered yet"},
            ],
        })
    }

    #[test]
    fn node_dot_names_every_peer_and_escapes_quotes() {
        let dot = to_dot(&from_node_status(&node_status()));
        assert!(dot.starts_with("graph meshtun {"), "{dot}");
        for needle in ["\"0:AAAA.0000.0001\"", "\"0:BBBB.0000.0002\"", "\"0:CCCC.0000.0003\"", "be\\\"ta", "direct 0.4 ms", "relay via 198.18.0.1:7400"] {
            assert!(dot.contains(needle), "missing {needle}: {dot}");
        }
        assert!(dot.contains("style=dashed"), "{dot}");
    }

    #[test]
    fn backbone_page_draws_records_and_relayed_pairs() {
        let status = json!({
            "listen": ["198.18.0.1:7400"],
            "records": [
                {"address": "0:AAAA.0000.0001", "hostname": "alpha", "observed": "198.18.0.2:51820", "endpoints": [], "expires_in_secs": 60.0},
                {"address": "0:BBBB.0000.0002", "hostname": "<b>", "observed": "198.18.0.3:51820", "endpoints": [], "expires_in_secs": 60.0},
            ],
            "pairs": [{"a": "0:AAAA.0000.0001", "b": "0:BBBB.0000.0002", "path": "relay", "relayed_bytes": 2048}],
            "stats": {"relayed_bytes": 2048, "relayed_packets": 3},
        });
        let html = backbone_html(&status);
        assert!(html.contains("<svg") && html.contains("0:AAAA.0000.0001") && html.contains("0:BBBB.0000.0002"), "{html}");
        assert!(html.contains("&lt;b&gt;") && !html.contains("<b>"), "hostnames must be escaped");
        assert!(html.contains("relay 2.0 KiB"), "{html}");
    }
}
