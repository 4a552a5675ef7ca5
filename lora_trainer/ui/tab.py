"""The Train LoRA tab: Gradio Blocks that run on Gradio 3.41 (A1111) and 4.x (Forge).

Only API present in both is used: no `.style()`, no `gr.File(type="file")`, no `_js`, updates through
`gr.update`, progress through a generator that polls the job runner (Gradio's queue, which both WebUIs
enable). Handlers live in `controller.py`; this file only lays out widgets and binds them.
"""

import time
from typing import Optional

from .controller import INSTALLED, TabController
from .form import advanced_specs, basic_specs
from .jobs import JobRunner, default_runner
from .form import network_types_text
from .presets import GOALS, TIERS, preset

POLL_S = 1.0
ADVANCED_GROUPS = (("model", "Model"), ("data", "Data and captions"), ("advanced", "Training, network, output"))


def trigger_note(trigger: str) -> str:
    if (trigger or "").strip():
        return (f"the trigger word {trigger.strip()!r} (Parameters) is put first in every caption when training; "
                f"the caption files stay without it")
    return ("no trigger word yet: set one in Parameters > Trigger word; it is put first in every caption when "
            "training (the caption files stay as they are)")


def gradio_major() -> int:
    import gradio as gr

    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 3


def _widget(gr, spec, value):
    common = dict(label=spec.label, elem_id=spec.elem_id, info=spec.tooltip)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=[str(c) for c in spec.choices], value=str(value), **common)
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    lines = 3 if spec.key in ("sample_prompts",) else 1
    return gr.Textbox(value=value, lines=lines, **common)


def build_tab(host, runner: Optional[JobRunner] = None, restore_on_load: bool = False):
    """The tab as a gr.Blocks, for `on_ui_tabs` or the standalone server.

    Every page load shows the current or last run and its settings: the standalone server (whose root Blocks
    this is) binds that to the page's load event (restore_on_load); inside a WebUI javascript/lora_trainer.js
    presses the hidden restore button once the UI is loaded."""
    import gradio as gr

    from .form import to_widget

    runner = runner or default_runner()
    ctl = TabController(host, runner)
    g4 = gradio_major() >= 4
    png = {"format": "png"} if g4 else {}  # Gradio 4 would save output images as lossy WebP otherwise
    initial_family = ctl.family()
    initial_tier = ctl.starting_tier()
    start_values = dict(preset(initial_tier, "style", initial_family))
    start_values.update(output_name="my_lora", output_dir=str(host.work_dir()))

    with gr.Blocks(analytics_enabled=False, elem_id="lora_trainer_tab") as tab:
        widgets: dict = {}

        # ---- Base model -----------------------------------------------------------------------------
        gr.Markdown("### 1. Base model", elem_id="lora_trainer_h_base")
        with gr.Row():
            base_info = gr.Textbox(label="Base model (from the WebUI)", value=ctl.base_model_text, lines=2,
                                   interactive=False, elem_id="lora_trainer_base_info", scale=4)
            base_refresh = gr.Button("Refresh", elem_id="lora_trainer_base_refresh", scale=1)
        if hasattr(host, "set_base_model"):
            with gr.Row():
                base_path = gr.Textbox(label="Checkpoint file or diffusers folder",
                                       value=getattr(host, "base_model_path", None) or "",
                                       elem_id="lora_trainer_base_path", scale=4)
                base_load = gr.Button("Load model", elem_id="lora_trainer_base_load", scale=1)
            base_load.click(ctl.set_base_model, [base_path], [base_info])
        base_refresh.click(ctl.base_model_text, None, [base_info])

        # ---- Dataset --------------------------------------------------------------------------------
        gr.Markdown("### 2. Dataset")
        with gr.Row():
            dataset_dir = gr.Textbox(label="Dataset folder",
                                     placeholder="/path/to/images (captions as .txt beside them)",
                                     elem_id="lora_trainer_dataset_dir", scale=4)
            dataset_load = gr.Button("Load folder", elem_id="lora_trainer_dataset_load", scale=1)
        with gr.Accordion("Upload images instead", open=False, elem_id="lora_trainer_upload_acc"):
            upload = gr.File(label="Images (and .txt captions)", file_count="multiple", elem_id="lora_trainer_upload")
            with gr.Row():
                upload_name = gr.Textbox(label="Dataset name", value="dataset", elem_id="lora_trainer_upload_name")
                upload_btn = gr.Button("Copy into a dataset folder", elem_id="lora_trainer_upload_btn")
        dataset_msg = gr.Textbox(label="Dataset", interactive=False, elem_id="lora_trainer_dataset_msg")
        gallery = gr.Gallery(label="Images and captions", columns=6, height=320, allow_preview=False,
                             elem_id="lora_trainer_gallery")
        with gr.Row():
            check_btn = gr.Button("Check dataset", elem_id="lora_trainer_check")
        report = gr.Textbox(label="Dataset check", lines=10, interactive=False, elem_id="lora_trainer_report")

        # ---- Captions -------------------------------------------------------------------------------
        gr.Markdown("### 3. Captions")
        taggers = ctl.taggers()
        with gr.Row():
            tagger = gr.Dropdown(label="Tagger", choices=taggers, value=taggers[0] if taggers else None,
                                 allow_custom_value=True, elem_id="lora_trainer_tagger")
            tagger_model = gr.Textbox(label="CLIP model (optional)",
                                      placeholder="ViT-B-32/openai, hf:org/model or hf:FOLDER",
                                      elem_id="lora_trainer_tagger_model")
            threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Threshold",
                                  elem_id="lora_trainer_threshold")
        with gr.Row():
            tag_mode = gr.Dropdown(label="Mode", choices=["tags", "caption"], value="tags",
                                   elem_id="lora_trainer_tag_mode")
            policy = gr.Dropdown(label="Images that have a caption", choices=["keep", "append", "overwrite"],
                                 value="keep", elem_id="lora_trainer_policy")
            autotag_btn = gr.Button("Autotag", elem_id="lora_trainer_autotag")
        with gr.Row():
            image_pick = gr.Dropdown(label="Image", choices=[], elem_id="lora_trainer_image_pick",
                                     allow_custom_value=True, scale=2)
            caption_box = gr.Textbox(label="Caption", lines=2, elem_id="lora_trainer_caption", scale=4)
            caption_save = gr.Button("Save caption", elem_id="lora_trainer_caption_save", scale=1)
        with gr.Row():
            bulk_action = gr.Dropdown(label="Bulk edit", choices=["add", "remove", "replace"], value="add",
                                      elem_id="lora_trainer_bulk_action")
            bulk_tag = gr.Textbox(label="Tag", elem_id="lora_trainer_bulk_tag")
            bulk_repl = gr.Textbox(label="Replace with", elem_id="lora_trainer_bulk_repl")
            bulk_pos = gr.Dropdown(label="Add at", choices=["start", "end"], value="end",
                                   elem_id="lora_trainer_bulk_pos")
            bulk_btn = gr.Button("Apply to all captions", elem_id="lora_trainer_bulk_btn")
        caption_msg = gr.Textbox(label="Caption messages", interactive=False, lines=2,
                                 elem_id="lora_trainer_caption_msg")

        # ---- Parameters -----------------------------------------------------------------------------
        gr.Markdown("### 4. Parameters")
        with gr.Row():
            tier = gr.Dropdown(label="GPU memory (this machine's is preselected)", choices=list(TIERS),
                               value=initial_tier, elem_id="lora_trainer_tier")
            goal = gr.Dropdown(label="Goal", choices=list(GOALS), value="style", elem_id="lora_trainer_goal")
            preset_btn = gr.Button("Apply preset (for the network type below)", elem_id="lora_trainer_preset")
        gr.Markdown(network_types_text(), elem_id="lora_trainer_network_types")
        basics = basic_specs()
        for row_start in range(0, len(basics), 4):
            with gr.Row():
                for spec in basics[row_start:row_start + 4]:
                    widgets[spec.key] = _widget(gr, spec, to_widget(spec, start_values.get(spec.key, spec.default)))
        with gr.Accordion("Advanced (every other option)", open=False, elem_id="lora_trainer_advanced"):
            adv = advanced_specs()
            for group, title in ADVANCED_GROUPS:
                members = [s for s in adv if s.group == group]
                if not members:
                    continue
                gr.Markdown(f"**{title}**")
                for row_start in range(0, len(members), 3):
                    with gr.Row():
                        for spec in members[row_start:row_start + 3]:
                            widgets[spec.key] = _widget(gr, spec, to_widget(spec, start_values.get(spec.key,
                                                                                                  spec.default)))
            rest = [s for s in adv if s.key not in widgets]
            for spec in rest:
                widgets[spec.key] = _widget(gr, spec, to_widget(spec, start_values.get(spec.key, spec.default)))
        with gr.Row():
            yaml_path = gr.Textbox(label="YAML config file (the same file the CLI reads)",
                                   placeholder="/path/to/my_lora.yaml", elem_id="lora_trainer_yaml_path", scale=4)
            yaml_save = gr.Button("Save YAML", elem_id="lora_trainer_yaml_save", scale=1)
            yaml_load = gr.Button("Load YAML", elem_id="lora_trainer_yaml_load", scale=1)
        yaml_upload = gr.File(label="...or load a YAML from your computer", file_types=[".yaml", ".yml"],
                              type="binary", elem_id="lora_trainer_yaml_upload")
        param_msg = gr.Textbox(label="Parameters", interactive=False, elem_id="lora_trainer_param_msg")

        # ---- Run ------------------------------------------------------------------------------------
        gr.Markdown("### 5. Train")
        with gr.Row():
            memory_box = gr.Textbox(label="Memory", interactive=False, lines=2, elem_id="lora_trainer_memory", scale=4)
            memory_btn = gr.Button("Estimate memory", elem_id="lora_trainer_memory_btn", scale=1)
        with gr.Row():
            start_btn = gr.Button("Start", variant="primary", elem_id="lora_trainer_start")
            stop_btn = gr.Button("Stop (save a checkpoint)", elem_id="lora_trainer_stop")
            watch_btn = gr.Button("Refresh progress", elem_id="lora_trainer_watch")
            restore_btn = gr.Button("restore", elem_id="lora_trainer_restore", elem_classes=["lora-trainer-hidden"])
            poll_btn = gr.Button("poll", elem_id="lora_trainer_poll", elem_classes=["lora-trainer-hidden"])
            # set by the restore handler: the page's script presses restore until this says it ran
            restored_mark = gr.Textbox(value="", elem_id="lora_trainer_restored", elem_classes=["lora-trainer-hidden"],
                                       show_label=False)
        with gr.Row():
            run_choices = ctl.run_choices()
            runs_pick = gr.Dropdown(label="Stopped run to resume (newest first; it continues with its own settings)",
                                    choices=run_choices, value=run_choices[0] if run_choices else None,
                                    allow_custom_value=True, elem_id="lora_trainer_runs_pick", scale=4)
            resume_btn = gr.Button("Resume", elem_id="lora_trainer_resume", scale=1)
            runs_refresh = gr.Button("Refresh runs", elem_id="lora_trainer_runs_refresh", scale=1)
        run_msg = gr.Textbox(label="Run", value=ctl.run_view()["run"], interactive=False,
                             elem_id="lora_trainer_run_msg")
        with gr.Row():
            with gr.Column(scale=3):
                status_box = gr.Textbox(label="Progress", value=ctl.run_view()["status"], lines=3,
                                        interactive=False, elem_id="lora_trainer_status")
                log_box = gr.Textbox(label="Messages", lines=8, max_lines=16, interactive=False,
                                     elem_id="lora_trainer_log")
            with gr.Column(scale=2):
                loss_img = gr.Image(label="Loss", type="pil", interactive=False, elem_id="lora_trainer_loss", **png)

        # ---- Preview --------------------------------------------------------------------------------
        gr.Markdown("### 6. Preview")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora_trainer_prompt", scale=4)
            prompt_fill = gr.Button("Trigger word + a caption", elem_id="lora_trainer_prompt_fill", scale=1)
        with gr.Row():
            lora_choices = ctl.lora_choices()
            lora_pick = gr.Dropdown(label="LoRA", choices=lora_choices, value=None, allow_custom_value=True,
                                    elem_id="lora_trainer_lora_pick")
            lora_refresh = gr.Button("Refresh", elem_id="lora_trainer_lora_refresh")
            ckpt_pick = gr.Dropdown(label="Checkpoint", choices=ctl.checkpoint_choices(), value=INSTALLED,
                                    elem_id="lora_trainer_ckpt_pick")
        with gr.Row():
            weight = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Weight", elem_id="lora_trainer_weight")
            seed = gr.Number(label="Seed", value=1234, precision=0, elem_id="lora_trainer_seed")
            steps = gr.Number(label="Steps", value=20, precision=0, elem_id="lora_trainer_steps")
            size = gr.Textbox(label="Size", value=str(start_values.get("resolution", 512)),
                              elem_id="lora_trainer_size")
        with gr.Row():
            gen_btn = gr.Button("Generate", variant="primary", elem_id="lora_trainer_generate")
            sweep_btn = gr.Button("Weight sweep 0 / 0.25 / 0.5 / 0.75 / 1", elem_id="lora_trainer_sweep")
        preview_msg = gr.Textbox(label="Preview", interactive=False, elem_id="lora_trainer_preview_msg")
        with gr.Row():
            preview_img = gr.Image(label="Preview image", type="pil", interactive=False,
                                   elem_id="lora_trainer_preview_img", **png)
            sweep_gallery = gr.Gallery(label="Weight sweep", columns=5, height=260, allow_preview=True,
                                       elem_id="lora_trainer_sweep_gallery")
        # the preview's generation parameters in the WebUIs' PNG-info form: the host's Send buttons read them
        preview_params = gr.Textbox(visible=False, elem_id="lora_trainer_preview_params")
        with gr.Row():
            try:
                host.send_buttons(preview_img, preview_params)
            except Exception as e:  # a WebUI without the paste machinery still gets the tab
                print(f"[lora-trainer] no Send to txt2img button: {type(e).__name__}: {e}")

        # ---- wiring ---------------------------------------------------------------------------------
        keys = list(widgets)
        form_inputs = [widgets[k] for k in keys]
        ext_widget = widgets.get("caption_extension")

        def values_of(args) -> dict:
            return dict(zip(keys, args))

        def ext_of(value) -> str:
            return value or ".txt"

        def load_folder(folder, ext, current_prompt, trig):
            items, choices, msg = ctl.load_dataset(folder, ext_of(ext))
            # the preview prompt starts as the trigger word + a caption of this dataset (unless typed already)
            new_prompt = ctl.default_prompt(folder, trig) if choices and not (current_prompt or "").strip() \
                else gr.update()
            return items, gr.update(choices=choices, value=choices[0] if choices else None), msg, \
                (ctl.caption_of(folder, choices[0], ext_of(ext)) if choices else ""), new_prompt

        dataset_outputs = [gallery, image_pick, dataset_msg, caption_box, prompt]
        dataset_inputs = [dataset_dir, ext_widget, prompt, widgets["caption_prefix"]]
        dataset_load.click(load_folder, dataset_inputs, dataset_outputs)
        dataset_dir.submit(load_folder, dataset_inputs, dataset_outputs)

        def do_upload(files, name, ext):
            folder, msg = ctl.import_uploads(files, name)
            if not folder:
                return gr.update(), gr.update(), gr.update(), msg, gr.update()
            items, choices, listing = ctl.load_dataset(folder, ext_of(ext))
            return folder, items, gr.update(choices=choices, value=choices[0] if choices else None), \
                f"{msg}\n{listing}", (ctl.caption_of(folder, choices[0], ext_of(ext)) if choices else "")

        upload_btn.click(do_upload, [upload, upload_name, ext_widget],
                         [dataset_dir, gallery, image_pick, dataset_msg, caption_box])

        def on_select(folder, ext, evt: gr.SelectData):
            _items, choices, _ = ctl.load_dataset(folder, ext_of(ext))
            if evt is None or evt.index is None or not choices:
                return gr.update(), gr.update()
            index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            if not 0 <= int(index) < len(choices):
                return gr.update(), gr.update()
            rel = choices[int(index)]
            return gr.update(value=rel), ctl.caption_of(folder, rel, ext_of(ext))

        gallery.select(on_select, [dataset_dir, ext_widget], [image_pick, caption_box])
        image_pick.change(lambda folder, rel, ext: ctl.caption_of(folder, rel, ext_of(ext)) if rel else "",
                          [dataset_dir, image_pick, ext_widget], [caption_box])

        def do_save_caption(folder, rel, caption, ext):
            msg = ctl.save_caption(folder, rel, caption, ext_of(ext))
            items, _choices, _ = ctl.load_dataset(folder, ext_of(ext))
            return msg, items

        caption_save.click(do_save_caption, [dataset_dir, image_pick, caption_box, ext_widget], [caption_msg, gallery])

        def do_bulk(folder, action, tag, repl, pos, ext, rel):
            msg = ctl.bulk_edit(folder, action, tag, repl, pos, ext_of(ext))
            items, _choices, _ = ctl.load_dataset(folder, ext_of(ext))
            return msg, items, (ctl.caption_of(folder, rel, ext_of(ext)) if rel else gr.update())

        bulk_btn.click(do_bulk, [dataset_dir, bulk_action, bulk_tag, bulk_repl, bulk_pos, ext_widget, image_pick],
                       [caption_msg, gallery, caption_box])

        def do_autotag(folder, tg, model, thr, trig, mode, pol, ext, rel):
            # the one trigger-word field is Parameters' caption_prefix: put first when training, never written
            msg = ctl.autotag(folder, tg, model, thr, "", mode, pol, ext_of(ext)) + "\n" + trigger_note(trig)
            items, _choices, _ = ctl.load_dataset(folder, ext_of(ext))
            return msg, items, (ctl.caption_of(folder, rel, ext_of(ext)) if rel else gr.update())

        autotag_btn.click(do_autotag, [dataset_dir, tagger, tagger_model, threshold, widgets["caption_prefix"], tag_mode,
                                       policy,
                                       ext_widget, image_pick], [caption_msg, gallery, caption_box])

        check_btn.click(lambda folder, *args: ctl.check_dataset(values_of(args), folder),
                        [dataset_dir] + form_inputs, [report])

        def do_preset(t, g, n):
            values = ctl.preset_values(t, g, n)
            return [gr.update(value=values[k]) if k in values else gr.update() for k in keys] + \
                [f"preset {g} / {t} for {n} applied (change anything before starting)"]

        def estimate(folder, *args):
            return ctl.memory(values_of(args), folder)

        preset_btn.click(do_preset, [tier, goal, widgets["network_type"]], form_inputs + [param_msg]).then(
            estimate, [dataset_dir] + form_inputs, [memory_box])

        def apply_loaded(values, folder, msg):
            if values is None:
                return [gr.update() for _ in keys] + [gr.update(), msg]
            return [gr.update(value=values[k]) if k in values else gr.update() for k in keys] + \
                [gr.update(value=folder) if folder else gr.update(), msg]

        yaml_save.click(lambda path, folder, *args: ctl.save_yaml(values_of(args), folder, path),
                        [yaml_path, dataset_dir] + form_inputs, [param_msg])
        yaml_load.click(lambda path: apply_loaded(*ctl.load_yaml(path)), [yaml_path],
                        form_inputs + [dataset_dir, param_msg])
        yaml_upload.upload(lambda data: apply_loaded(*ctl.load_yaml(data=data)) if data else
                           [gr.update() for _ in keys] + [gr.update(), gr.update()], [yaml_upload],
                           form_inputs + [dataset_dir, param_msg])

        run_outputs = [status_box, log_box, loss_img, ckpt_pick, lora_pick, run_msg, runs_pick]

        def runs_update():
            choices = ctl.run_choices()
            return gr.update(choices=choices, value=choices[0] if choices else None)

        def view_updates(view, runs: bool = False):
            # the resumable runs change when a run ends (or on a page load), not on every poll
            return [view["status"], view["log"], view["loss"], gr.update(choices=view["checkpoints"]),
                    gr.update(choices=ctl.lora_choices(), value=view["lora"]) if view["lora"] else gr.update(),
                    view["run"], runs_update() if runs or view["done"] else gr.update()]

        def watch():
            while True:
                view = ctl.run_view()
                yield view_updates(view)
                if view["done"]:
                    return
                time.sleep(POLL_S)

        start_btn.click(lambda folder, *args: ctl.start(values_of(args), folder), [dataset_dir] + form_inputs,
                        [run_msg, memory_box]).then(watch, None, run_outputs)
        memory_btn.click(estimate, [dataset_dir] + form_inputs, [memory_box])
        # the preview's size follows the training resolution (a tiny test model at the tier's 512 px makes NaNs)
        if "resolution" in widgets:
            widgets["resolution"].change(lambda r: str(r or "").replace(" ", ""), [widgets["resolution"]], [size])

        def do_resume(label):
            values, folder, msg = ctl.resume_run(label)
            return apply_loaded(values, folder, msg)

        resume_btn.click(do_resume, [runs_pick], form_inputs + [dataset_dir, run_msg]).then(watch, None, run_outputs)
        runs_refresh.click(runs_update, None, [runs_pick])
        stop_btn.click(ctl.stop, None, [run_msg])
        watch_btn.click(watch, None, run_outputs)

        def restore():
            state = ctl.restore()
            values = state["values"]
            form = [gr.update(value=values[k]) if values and k in values else gr.update() for k in keys]
            return form + [gr.update(value=state["folder"]) if state["folder"] else gr.update()] + \
                view_updates(state["view"], runs=True) + [str(time.time())]

        def poll():  # javascript/lora_trainer.js: keeps Progress current for runs started elsewhere (API, tab)
            view = ctl.run_view()
            return view["status"], view["run"], view["log"]

        poll_btn.click(poll, None, [status_box, run_msg, log_box])

        restore_outputs = form_inputs + [dataset_dir] + run_outputs + [restored_mark]
        restore_btn.click(restore, None, restore_outputs).then(watch, None, run_outputs)
        if restore_on_load:
            tab.load(restore, None, restore_outputs).then(watch, None, run_outputs)

        prompt_fill.click(lambda folder, trig: ctl.default_prompt(folder, trig),
                          [dataset_dir, widgets["caption_prefix"]], [prompt])
        lora_refresh.click(lambda: (gr.update(choices=ctl.lora_choices()), gr.update(choices=ctl.checkpoint_choices())),
                           None, [lora_pick, ckpt_pick])
        gen_btn.click(ctl.generate, [prompt, lora_pick, ckpt_pick, weight, seed, steps, size],
                      [preview_img, preview_msg, preview_params])
        sweep_btn.click(ctl.sweep, [prompt, lora_pick, ckpt_pick, seed, steps, size], [sweep_gallery, preview_msg])

    tab.lora_trainer_controller = ctl  # for tests and the API
    return tab
