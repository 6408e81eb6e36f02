"""The report as one self-contained HTML page, rendered from the report's document
(``report_figures.compute``): inline CSS, charts as inline SVG (``report_svg``), a small
inline script that only sorts tables (the page reads the same without it). Nothing is
fetched.

Every string from the store is escaped here (``_e``): hostnames and finding messages come
from devices, and a hostile one must not put markup or script into the auditor's page.
Every figure carries ``data-key`` and ``data-value`` (its value in the JSON document), so
that a test, or an auditor's tool, reads the numbers back without parsing prose.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from devtrust.verifier import report_svg
from devtrust.verifier.logtext import printable
from devtrust.verifier.report_svg import TIER_COLOURS, zone_label

STATES = ("enrolled", "pending_approval", "revoked")
# Rows of a long list shown on the page (the JSON holds them all).
ROWS = 100
# Characters of a finding's example message shown (device text: non-printables escaped).
EXAMPLE = 400
_SEVERITY_COLOUR = {
    "contraindicated": TIER_COLOURS["contraindicated"],
    "warning": TIER_COLOURS["warning"],
    "info": "#6b7280",
}
_STYLE = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--ok:#2f9e5a;--warn:#e3a008;
--bad:#d64545;--none:#9aa0a6}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
header{border-bottom:3px solid var(--ink);padding-bottom:12px;margin-bottom:20px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 10px}
h3{font-size:15px;margin:14px 0 6px}
.meta{color:var(--muted);font-size:13px}.meta b{color:var(--ink);font-weight:600}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 22px;
margin:0 0 18px;break-inside:avoid}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:12px;margin:0 0 18px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .big{font-size:26px;font-weight:700;display:block;line-height:1.2}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top;
overflow-wrap:break-word}
td code,td b,.msg{overflow-wrap:anywhere}
time{white-space:nowrap}
.scroll{overflow-x:auto}
th{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em;
background:#f9fafb;white-space:nowrap}
table.sortable th{cursor:pointer}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfcfd}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.id{color:var(--muted)}
.claim{color:var(--muted);font-size:12px}.host{color:var(--ink)}
.dup{color:var(--bad);font-size:12px;font-weight:600}
.tier{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;
font-weight:600}
.t-affirming{background:var(--ok)}.t-warning{background:var(--warn)}
.t-contraindicated{background:var(--bad)}.t-none{background:var(--none)}
.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}
.note{color:var(--muted);font-size:13px}
.banner{padding:10px 14px;border-radius:8px;margin:0 0 14px;font-weight:600}
.banner.ok{background:#e8f5ee;color:#1d6b3c}.banner.bad{background:#fdecec;color:#9b2222}
.banner.info{background:#eef2f7;color:#334155}
.chart{display:block;max-width:100%;height:auto;margin:6px 0 4px}
.msg{color:#374151;font-size:12px;word-break:break-word}
#script-errors:empty{display:none}
#script-errors{white-space:pre-wrap;color:var(--bad)}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
@media print{body{background:#fff;font-size:12px}main{max-width:none;padding:0}
section,.card{border-color:#bbb}section{page-break-inside:avoid}
.tier,.banner,rect,.card{-webkit-print-color-adjust:exact;print-color-adjust:exact}
table.sortable th{cursor:default}}
"""
# First script of the page: errors of any later script are recorded into #script-errors
# (a test reads the page's DOM for them).
_ERRORS_SCRIPT = """
window.__reportErrors=[];
function __reportError(m){var e=document.getElementById('script-errors');
if(e){e.textContent+=m+'\\n';}else{window.__reportErrors.push(m);}}
window.onerror=function(m,s,l,c){__reportError('error: '+m+' (line '+l+':'+c+')');};
window.addEventListener('unhandledrejection',function(ev){__reportError('rejection: '+ev.reason);});
"""
# Last script: click a header of a sortable table to sort by that column; then mark that
# the scripts ran.
_SORT_SCRIPT = """
(function(){
var errs=document.getElementById('script-errors');
window.__reportErrors.forEach(function(m){errs.textContent+=m+'\\n';});
function key(td){var v=td.getAttribute('data-sort');if(v===null){v=td.textContent.trim();}
var n=parseFloat(v);return (v!==''&&!isNaN(n)&&isFinite(v))?n:v.toLowerCase();}
document.querySelectorAll('table.sortable').forEach(function(table){
table.querySelectorAll('thead th').forEach(function(th,col){
th.addEventListener('click',function(){
var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
if(x===y){return 0;}return (x<y?-1:1)*(asc?1:-1);});
rows.forEach(function(r){body.appendChild(r);});});});});
document.getElementById('script-done').setAttribute('data-ran','1');
})();
"""


def _script_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


# Only the page's own two scripts run (their hashes), whatever markup escaping would miss
# (review L6); no <base>, no form posts anywhere (these do not fall back to default-src).
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    f"form-action 'none'; script-src {_script_hash(_ERRORS_SCRIPT)} {_script_hash(_SORT_SCRIPT)}"
)


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _value(value: object) -> str:
    return json.dumps(value)


def num(key: str, value: object, text: str | None = None, *, cls: str = "") -> str:
    """A figure: shown as ``text`` (default: the value), with its key and JSON value."""
    shown = text if text is not None else ("n/a" if value is None else str(value))
    attr = f' class="{cls}"' if cls else ""
    return f'<span{attr} data-key="{_e(key)}" data-value="{_e(_value(value))}">{_e(shown)}</span>'


def cell(key: str, value: object, text: str | None = None) -> str:
    """A figure in a numeric table cell (sorted by its value)."""
    order = _e(_value(value if isinstance(value, int | float) else -1))
    return f'<td class="n" data-sort="{order}">{num(key, value, text)}</td>'


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def tier_badge(tier: str) -> str:
    name = tier if tier in TIER_COLOURS else "none"
    return f'<span class="tier t-{name}">{_e(tier)}</span>'


def device_cell(item: Mapping[str, Any]) -> str:
    """The device: its id first (what identifies it), then the hostname it claimed,
    neutralised (``hostname_shown``: non-printable characters escaped, clipped) and marked
    when other devices claim it too (review M6)."""
    device_id = str(item.get("device_id", ""))
    shown = str(item.get("hostname_shown") or "")
    shared = int(item.get("hostname_shared") or 0)
    claim = (
        f'<span class="claim">claimed hostname <span class="host">{_e(shown)}</span></span>'
        if shown
        else '<span class="claim">no hostname claimed</span>'
    )
    if shared > 1:
        claim += f' <span class="dup">claimed by {shared} devices</span>'
    return (
        f'<td data-sort="{_e(device_id)}"><code class="dev" title="{_e(device_id)}">'
        f"{_e(short_id(device_id))}</code><br>{claim}</td>"
    )


def short_id(device_id: str) -> str:
    """A device id (64 hex) as shown: its first 12 and last 4 characters (the whole in the
    title)."""
    return device_id if len(device_id) <= 20 else f"{device_id[:12]}\u2026{device_id[-4:]}"


def _when(stamp: object) -> str:
    if not stamp:
        return "n/a"
    return _e(str(stamp)[:19].replace("T", " ")) + " UTC"


def _at(stamp: object) -> str:
    """A time in a table cell: month, day and time (UTC), the whole time as its title."""
    if not stamp:
        return "n/a"
    text = str(stamp)
    return (
        f'<time datetime="{_e(text)}" title="{_e(text)}">{_e(text[5:19].replace("T", " "))}</time>'
    )


def _table(headers: Sequence[str], rows: Sequence[str], *, numeric: Sequence[int] = ()) -> str:
    head = "".join(
        f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    return (
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def render(doc: Mapping[str, Any]) -> str:
    """The page of the report's document ``doc``."""
    zone = doc.get("zone_filter")
    title = "Fleet attestation report" + (f": zone {zone_label(zone)}" if zone is not None else "")
    body = [
        _header(doc, title),
        _cards(doc),
        *[f'<div class="banner info">{_e(note)}</div>' for note in doc.get("notes", [])],
        _fleet(doc),
        _history(doc),
        _findings(doc),
        _detect(doc),
        _revoked(doc),
        _drivers(doc),
        _policy_audit(doc),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style>"
        f"<script>{_ERRORS_SCRIPT}</script></head><body><main>"
        '<div id="script-errors"></div>'
        + "".join(body)
        + f"<footer>devtrust report (document version {_e(doc.get('version'))}); generated "
        f"{_when(doc.get('generated_at'))}</footer>"
        f'</main><div id="script-done" hidden></div><script>{_SORT_SCRIPT}</script>'
        "</body></html>\n"
    )


def _header(doc: Mapping[str, Any], title: str) -> str:
    period = doc["period"]
    return (
        f"<header><h1>{_e(title)}</h1>"
        f'<div class="meta">Period <b>{_when(period["since"])}</b> to '
        f"<b>{_when(period['until'])}</b> (history in buckets of {_e(period['bucket'])}) "
        f"&middot; generated <b>{_when(doc['generated_at'])}</b> &middot; database "
        f"<code>{_e(doc.get('database') or '')}</code></div></header>"
    )


def fleet_at(doc: Mapping[str, Any]) -> str:
    """When the fleet's figures are of: "now", or "at" the period's end."""
    at = doc["fleet_at"]
    return "now" if at["now"] else f"at {_when(at['at'])}"


def _cards(doc: Mapping[str, Any]) -> str:
    fleet = doc["fleet"]
    tiers = fleet["tiers"]
    audit = doc["audit"]
    median = doc["time_to_detect"]["median_s"]
    revoked, drivers = len(doc["revoked_certificates"]), len(doc["drivers_below_bulletins"])
    intact = audit["intact"]
    chains = "not verified" if not audit["verified"] else ("intact" if intact else "BROKEN")
    items = [
        ("Devices", num("fleet.devices", fleet["devices"])),
        ("Compliance", num("fleet.compliance", fleet["compliance"], pct(fleet["compliance"]))),
        ("Affirming", num("fleet.tiers.affirming", tiers["affirming"])),
        ("Warning", num("fleet.tiers.warning", tiers["warning"])),
        ("Contraindicated", num("fleet.tiers.contraindicated", tiers["contraindicated"])),
        ("Appraisals in period", num("appraisals", doc["appraisals"])),
        ("Certificates revoked", num("revoked_certificates.count", revoked)),
        ("Median time to detect", num("time_to_detect.median_s", median, seconds(median))),
        ("Drivers below bulletins", num("drivers_below_bulletins.count", drivers)),
        (
            "Audit chains",
            num("audit.intact", intact, chains, cls=_ok(intact is not False)),
        ),
    ]
    return (
        f'<p class="note">Devices, compliance, tiers and drivers: the fleet {fleet_at(doc)}'
        + ("" if doc["fleet_at"]["now"] else " (the period's end)")
        + "; appraisals, certificates revoked and time to detect: over the period.</p>"
        '<div class="cards">'
        + "".join(
            f'<div class="card"><span class="label">{_e(label)}</span>'
            f'<span class="big">{value}</span></div>'
            for label, value in items
        )
        + "</div>"
    )


def _ok(good: bool) -> str:
    return "ok" if good else "bad"


def _fleet(doc: Mapping[str, Any]) -> str:
    zones: Mapping[str, Any] = doc["zones"]
    fleet = doc["fleet"]
    title = f"<h2>The fleet {fleet_at(doc)}</h2>"
    if not zones:
        return (
            f"<section>{title}"
            '<p class="banner info">No devices: the database holds no enrolled device'
            + (" in this zone" if doc.get("zone_filter") is not None else "")
            + ".</p></section>"
        )
    rows = []
    for name, z in zones.items():
        k = f"zones.{name}"
        states, tiers = z["states"], z["tiers"]
        rows.append(
            f'<tr><td data-sort="{_e(name)}"><b>{_e(zone_label(name))}</b></td>'
            f"<td>{tier_badge(z['min_tier'])}</td>"
            + cell(f"{k}.devices", z["devices"])
            + "".join(cell(f"{k}.states.{s}", states.get(s, 0)) for s in STATES)
            + "".join(cell(f"{k}.tiers.{t}", tiers[t]) for t in TIER_COLOURS)
            + cell(f"{k}.compliance", z["compliance"], pct(z["compliance"]))
            + "</tr>"
        )
    chart_rows = [(zone_label(n), z["tiers"]) for n, z in zones.items()]
    if len(zones) > 1:
        chart_rows.append(("whole fleet", fleet["tiers"]))
    headers = ["Zone", "Minimum", "Devices", "Enrolled", "Pending", "Revoked",
               "Affirming", "Warning", "Contraind.", "No result", "Compliance"]  # fmt: skip
    later = int(doc["fleet_at"].get("devices_later") or 0)
    return (
        f"<section>{title}"
        f'<p class="note">{_e(doc["definitions"]["compliance"])} '
        f"{_e(doc['definitions']['fleet'])} Tiers count enrolled devices; "
        "&ldquo;no result&rdquo;: none yet, or expired.</p>"
        + (
            f'<p class="note">{num("fleet_at.devices_later", later)} devices enrolled after '
            "then are not counted.</p>"
            if later
            else ""
        )
        + report_svg.tier_mix(chart_rows)
        + _table(headers, rows, numeric=range(2, 11))
        + "</section>"
    )


def _history(doc: Mapping[str, Any]) -> str:
    history = doc["history"]
    series = dict(history["zones"])
    if len(series) > 1:
        series = {**series, "whole fleet": history["fleet"]}
    if not history["ends"] or not any(v is not None for s in series.values() for v in s):
        chart = '<p class="note">No appraisals in the period or before it.</p>'
    else:
        chart = report_svg.compliance_over_time(history["ends"], series)
    rows = []
    for i, end in enumerate(history["ends"]):
        cells = "".join(
            cell(f"history.zones.{z}.{i}", v[i], pct(v[i])) for z, v in history["zones"].items()
        )
        fleet = history["fleet"][i]
        rows.append(
            f"<tr><td>{_at(end)}</td>{cells}"
            + cell(f"history.fleet.{i}", fleet, pct(fleet))
            + cell(f"history.enrolled.{i}", history["enrolled"][i])
            + "</tr>"
        )
    headers = ["Bucket end", *(zone_label(z) for z in history["zones"]), "Fleet", "Enrolled"]
    n = len(headers)
    return (
        "<section><h2>Compliance over time</h2>"
        f'<p class="note">Buckets of {_e(doc["period"]["bucket"])} (UTC). '
        f"{_e(doc['definitions']['history'])}</p>"
        + chart
        + "<details><summary>Figures</summary>"
        + _table(headers, rows, numeric=range(1, n))
        + "</details></section>"
    )


def _findings(doc: Mapping[str, Any]) -> str:
    findings = doc["findings"]
    if not findings:
        return (
            "<section><h2>Most frequent findings</h2>"
            '<p class="note">No appraisal in the period had a finding.</p></section>'
        )
    chart = report_svg.bars(
        [
            (f["id"], f["appraisals"], _SEVERITY_COLOUR.get(f["severity"], "#6b7280"))
            for f in findings
        ]
    )
    blocks = []
    for f in findings:
        k = f"findings.{f['id']}"
        devices = "".join(
            f"<tr>{device_cell(d)}<td>{_e(zone_label(d['zone']))}</td>"
            f'<td class="n">{num(k + ".devices." + d["device_id"], d["appraisals"])}</td>'
            f"<td>{_at(d['last_at'])}</td></tr>"
            for d in f["devices"]
        )
        more = f["device_count"] - len(f["devices"])
        blocks.append(
            f"<h3><code>{_e(f['id'])}</code> {tier_badge(f['severity'])} in "
            f"{num(k + '.appraisals', f['appraisals'])} appraisals of "
            f"{num(k + '.device_count', f['device_count'])} devices</h3>"
            f'<div class="msg">e.g. {_e(printable(f["example"], EXAMPLE))}</div>'
            + _table(["Device", "Zone", "Appraisals", "Last seen with it"], [devices], numeric=(2,))
            + (f'<p class="note">And {more} more devices, with fewer.</p>' if more > 0 else "")
        )
    return (
        "<section><h2>Most frequent findings</h2>"
        '<p class="note">Appraisals in the period that carried each finding (counted once per '
        f"appraisal), and the devices that had it. {_e(doc['definitions']['devices'])}</p>"
        + chart
        + "".join(blocks)
        + "</section>"
    )


def _detect(doc: Mapping[str, Any]) -> str:
    ttd = doc["time_to_detect"]
    zone_rows = [
        f'<tr><td data-sort="{_e(z)}">{_e(zone_label(z))}</td>'
        + cell(f"time_to_detect.zones.{z}.count", s["count"])
        + cell(f"time_to_detect.zones.{z}.median_s", s["median_s"], seconds(s["median_s"]))
        + cell(f"time_to_detect.zones.{z}.max_s", s["max_s"], seconds(s["max_s"]))
        + "</tr>"
        for z, s in ttd["zones"].items()
    ]
    detections = [
        f"<tr>{device_cell(d)}<td>{_e(zone_label(d['zone']))}</td>"
        f"<td>{_at(d['last_affirming_at'])}</td><td>{_at(d['detected_at'])}</td>"
        f'<td class="n" data-sort="{d["seconds"]}">{_e(seconds(d["seconds"]))}</td>'
        f"<td>{tier_badge(d['tier'])}</td>"
        f"<td>{'<br>'.join(f'<code>{_e(x)}</code>' for x in d['findings'])}</td></tr>"
        for d in _longest(ttd["detections"])
    ]
    summary = (
        f"<p>{num('time_to_detect.count', ttd['count'])} detections in the period; median "
        f"{num('time_to_detect.median_s', ttd['median_s'], seconds(ttd['median_s']))}, 90th "
        f"percentile {num('time_to_detect.p90_s', ttd['p90_s'], seconds(ttd['p90_s']))}, "
        f"longest {num('time_to_detect.max_s', ttd['max_s'], seconds(ttd['max_s']))}.</p>"
    )
    return (
        "<section><h2>Time to detect</h2>"
        f'<p class="note"><b>How it is measured.</b> {_e(doc["definitions"]["time_to_detect"])}</p>'
        + summary
        + (_table(["Zone", "Detections", "Median", "Longest"], zone_rows, numeric=(1, 2, 3))
           if zone_rows else "")
        + (_table(["Device", "Zone", "Last affirming", "Detected", "Time", "Tier", "Findings"],
                  detections, numeric=(4,)) if detections else "")
        + _more(ttd["count"] - len(detections), "detections, the shorter ones")
        + "</section>"
    )  # fmt: skip


def _longest(detections: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ROWS longest detections, in the order they happened."""
    kept = sorted(range(len(detections)), key=lambda i: -float(detections[i]["seconds"]))
    return [detections[i] for i in sorted(kept[:ROWS])]


def _more(count: int, what: str) -> str:
    if count <= 0:
        return ""
    return f'<p class="note">And {count} more {_e(what)}.</p>'


def _revoked(doc: Mapping[str, Any]) -> str:
    certs = [
        f"<tr><td><code>{_e(c['serial'])}</code></td>{device_cell(c)}"
        f"<td>{_e(zone_label(c['zone']))}</td><td>{_e(c['kind'])}</td>"
        f'<td class="msg">{_e(c["reason"])}</td><td>{_at(c["revoked_at"])}</td></tr>'
        for c in doc["revoked_certificates"][-ROWS:]
    ]
    devices = [
        f"<tr>{device_cell(d)}<td>{_e(zone_label(d['zone']))}</td>"
        f"<td>{_at(d['revoked_at'])}</td></tr>"
        for d in doc["revoked_devices"]
    ]
    return (
        "<section><h2>Revocations</h2>"
        f"<h3>Certificates revoked in the period: "
        f"{num('revoked_certificates.count', len(doc['revoked_certificates']))}</h3>"
        + (_table(["Serial", "Device", "Zone", "Kind", "Reason", "Revoked"], certs) if certs
           else '<p class="note">None.</p>')
        + _more(len(doc["revoked_certificates"]) - len(certs), "certificates, revoked earlier")
        + f"<h3>Devices revoked ({fleet_at(doc)}): "
        f"{num('revoked_devices.count', len(devices))}</h3>"
        + (_table(["Device", "Zone", "Revoked"], devices) if devices
           else '<p class="note">None.</p>')
        + "</section>"
    )  # fmt: skip


def _drivers(doc: Mapping[str, Any]) -> str:
    items = doc["drivers_below_bulletins"]
    rows = [
        f"<tr>{device_cell(d)}<td>{_e(zone_label(d['zone']))}</td>"
        f"<td><code>{_e(d['driver_shown'])}</code></td>"
        f"<td>{_e(', '.join(d['bulletins']))}</td>"
        f'<td class="n">{num("drivers." + d["device_id"] + ".cves", d["cves"])}</td>'
        f'<td class="n">{num("drivers." + d["device_id"] + ".max_cvss", d["max_cvss"])}</td>'
        f"<td><code>{_e(d['fixed_in'] or 'n/a')}</code></td>"
        f"<td><code>{_e(d['latest_fixed_in_branch'] or 'n/a')}</code></td>"
        f"<td>{_at(d['appraised_at'])}</td></tr>"
        for d in items
    ]
    return (
        "<section><h2>GPU drivers below the NVIDIA security bulletins</h2>"
        f'<p class="note">Devices whose latest result {fleet_at(doc)} has the finding '
        "<code>gpu.driver.security_bulletins</code>: the bulletins whose fixed version for the "
        "driver's branch is above the running driver. The driver version is the one the "
        "finding names (the device's claim): shown when it is a version (digits and dots), the "
        "bulletins computed from it and the NVIDIA bulletins' data, as the verifier does; "
        "otherwise &ldquo;unparseable&rdquo; (escaped), or &ldquo;unmatched&rdquo; when the "
        "finding is not what the rule writes for that version, without figures. &ldquo;Fixed "
        "in&rdquo;: the lowest version that fixes all of them.</p>"
        + (_table(["Device", "Zone", "Driver", "Bulletins", "CVEs", "Max CVSS", "Fixed in",
                   "Latest in branch", "Appraised"], rows, numeric=(4, 5)) if rows
           else '<p class="note">None: no device reports a driver below a bulletin.</p>')
        + "</section>"
    )  # fmt: skip


def _row(header: str, value: str) -> str:
    return f"<tr><th>{_e(header)}</th><td>{value}</td></tr>"


def _policy_audit(doc: Mapping[str, Any]) -> str:
    policy, audit = doc["policy"], doc["audit"]
    used = ", ".join(f"{_e(k)} ({v})" for k, v in policy["in_latest_results"].items())
    if not audit["verified"]:
        banner = (
            f'<div class="banner info">Audit chains {_e(audit["why"] or "not verified")}; '
            f"the audit holds entries up to {num('audit.last_id', audit['last_id'])} "
            f"({_when(audit['last_at'])}).</div>"
        )
    elif audit["intact"]:
        banner = (
            f'<div class="banner ok">Audit trail verified: every chain intact, '
            f"{num('audit.entries', audit['entries'])} entries on "
            f"{num('audit.chains', audit['chains'])} chains, up to entry "
            f"{num('audit.last_id', audit['last_id'])} ({_when(audit['last_at'])}).</div>"
        )
    else:
        banner = (
            f'<div class="banner bad">Audit trail BROKEN: '
            f"{num('audit.broken.count', len(audit['broken']))} chains broken; the first broken "
            f"record: {_e(audit['broken'][0])}</div>"
            + "".join(f'<div class="msg">{_e(line)}</div>' for line in audit["broken"][1:])
        )
    return (
        "<section><h2>Policy and audit trail</h2>"
        "<table><tbody>"
        + _row("Policy in force now", f"<code>{_e(policy['policy_id'] or 'none published')}</code>")
        + _row("Digest (sha256)", f"<code>{_e(policy['digest'] or 'n/a')}</code>")
        + _row(
            "Published",
            f"{_when(policy['published_at'])} by {_e(policy['published_by'] or 'n/a')}",
        )
        + _row(f"Policies in the results {fleet_at(doc)}", used or "none")
        + "</tbody></table>"
        "<h3>Audit chains</h3>" + banner
        + '<p class="note">As <code>devtrust audit verify</code> checks them: every hash chain, '
        "its checkpoints and announcements, read in the same snapshot as every figure of this "
        "report.</p></section>"
    )  # fmt: skip
