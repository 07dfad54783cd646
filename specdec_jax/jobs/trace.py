"""job=trace: step-by-step run over the same jitted phases, streamed and recorded.

Streams row 0's text to the terminal as it is committed, writes one JSON line
per step to ``trace.jsonl`` (drafts, accepted count, emitted tokens, draft and
verify wall times per row) and renders ``trace.html``: per step, accepted
drafts, the first rejected draft and the token the target put in its place.
"""

import html
import os
import sys

from specdec_jax import runtime
from specdec_jax.jobs import generate as generate_job
from specdec_jax.jobs import io


def run(config, workdir: str, log=print) -> dict:
  workdir = io.prepare_workdir(workdir)
  prompts = runtime.load_prompt_list(config)[:config.batch_size]
  rt = runtime.build(config)
  prompt_ids = [rt.encode_prompt(p) for p in prompts]
  baseline = rt.drafter is None
  generator = rt.generator(baseline=baseline)
  kwargs = rt.run_kwargs(baseline=baseline)
  kwargs["costs"] = rt.measure_costs(generator, prompt_ids, log)
  seeds = [config.seed + i for i in range(len(prompts))]

  trace_path = os.path.join(workdir, "trace.jsonl")
  if os.path.exists(trace_path):
    os.remove(trace_path)
  steps = []
  streamed = ""
  log(f"--- prompt: {generate_job.prompt_record(prompts[0])[0][:200]!r}")
  committed = [[] for _ in prompts]
  for st in generator.iterate(rt.target_params, rt.draft_params, prompt_ids,
                              seeds=seeds, **kwargs):
    trace_rows = st.rows   # set on the last step
    record = {"step": st.step, "draft_time_s": st.draft_time_s,
              "verify_time_s": st.verify_time_s, "rows": []}
    for b in range(len(prompts)):
      committed[b].extend(st.emitted[b])
      record["rows"].append({
          "drafts": st.drafts[b], "accepted": st.accepted[b],
          "emitted": st.emitted[b], "finished": st.finished[b],
          "drafts_text": [rt.tokenizer.decode([t]) for t in st.drafts[b]],
          "emitted_text": [rt.tokenizer.decode([t]) for t in st.emitted[b]]})
    io.append_jsonl(trace_path, record)
    steps.append(record)
    text = rt.tokenizer.decode(committed[0], skip_special=True)
    if text.startswith(streamed):
      sys.stdout.write(text[len(streamed):])
      sys.stdout.flush()
    streamed = text
  sys.stdout.write("\n")
  html_path = os.path.join(workdir, "trace.html")
  with open(html_path, "w") as f:
    f.write(render_html(steps, [generate_job.prompt_record(p)[0] for p in prompts]))
  rows = trace_rows
  summary = {"job": "trace", "steps": len(steps), "num_prompts": len(prompts),
             "output_ids": [r.output_ids for r in rows],
             "draft_time_s": sum(s["draft_time_s"] for s in steps),
             "verify_time_s": sum(s["verify_time_s"] for s in steps)}
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  log(f"wrote {trace_path} and {html_path} ({len(steps)} steps)")
  return summary


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
.tok { font-family: monospace; white-space: pre; padding: 0 2px; margin: 0 1px; }
.acc { background: #c8f0c8; }
.rej { background: #f6c6c6; text-decoration: line-through; }
.fix { background: #c6d8f6; }
.bonus { background: #f3e6a6; }
.time { color: #666; font-size: 90%; }
"""


def _tok(text: str, cls: str) -> str:
  return f'<span class="tok {cls}">{html.escape(repr(text)[1:-1])}</span>'


def render_html(steps: list[dict], prompts: list[str]) -> str:
  """Self-contained page: one table per row, one line per step."""
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>specdec trace</title>"
           f"<style>{_STYLE}</style></head><body><h1>Speculative decoding trace</h1>",
           "<p>Legend: " + _tok("accepted", "acc") + _tok("rejected draft", "rej") +
           _tok("target's token", "fix") + _tok("bonus", "bonus") + "</p>"]
  for b, prompt in enumerate(prompts):
    parts.append(f"<h2>Row {b}</h2><p><b>Prompt:</b> {html.escape(prompt[:500])}</p>")
    parts.append("<table><tr><th>step</th><th>tokens</th><th>accepted</th>"
                 "<th>draft ms</th><th>verify ms</th></tr>")
    for s in steps:
      row = s["rows"][b]
      if row["accepted"] < 0:
        continue
      n = row["accepted"]
      cells = [_tok(t, "acc") for t in row["emitted_text"][:n]]
      if n < len(row["drafts_text"]):
        cells.append(_tok(row["drafts_text"][n], "rej"))
      extra = row["emitted_text"][n:n + 1]
      if extra:
        cells.append(_tok(extra[0], "fix" if n < len(row["drafts"]) else "bonus"))
      parts.append(
          f"<tr><td>{s['step']}</td><td>{''.join(cells)}</td>"
          f"<td>{n}/{len(row['drafts'])}</td>"
          f"<td class='time'>{1e3 * s['draft_time_s']:.2f}</td>"
          f"<td class='time'>{1e3 * s['verify_time_s']:.2f}</td></tr>")
    parts.append("</table>")
  parts.append("</body></html>")
  return "\n".join(parts)
