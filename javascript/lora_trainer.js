// lora-trainer: front-end glue the WebUI injects (every javascript/*.js; onUiLoaded and gradioApp come from
// its script.js).
// - On every page load, show the current or last training run and its settings in the Train LoRA tab.
// - Keep the tab's Progress current by itself (also for runs started elsewhere, e.g. through the API).
// - While a run holds the WebUI, txt2img and img2img say why a generation waits and where to stop training.
// - The WebUI's Interrupt is meant for a generation; during training it stops the run only if the person says so.
// - When a run finishes, the WebUI's Lora cards are refreshed so the new LoRA is there at once.
(function () {
    var POLL_RUNNING_MS = 3000;
    var POLL_IDLE_MS = 15000;
    var lastPoll = 0;

    function byId(id) {
        return gradioApp().getElementById(id);
    }

    function textOf(id) {
        var box = gradioApp().querySelector("#" + id + " textarea");
        return box ? box.value : "";
    }

    function trainingLine() {
        if (!/^(waiting|running|finishing)/.test(textOf("lora_trainer_run_msg"))) {
            return null;
        }
        return textOf("lora_trainer_status").split("\n")[0];
    }

    function showNotice(line) {
        ["txt2img", "img2img"].forEach(function (name) {
            var root = byId("tab_" + name);
            if (!root) {
                return;
            }
            var box = root.querySelector(".lora-trainer-notice");
            if (!line) {
                if (box) {
                    box.remove();
                }
                return;
            }
            if (!box) {
                box = document.createElement("div");
                box.className = "lora-trainer-notice";
                root.insertBefore(box, root.firstChild);
            }
            box.textContent = "Training LoRA (" + line + "). Generation waits until it ends; stop it in the " +
                "Train LoRA tab.";
        });
    }

    var wasTraining = false;

    function refreshLoraCards() {
        // the WebUI's own hidden refresh buttons of the Lora pages (what its Refresh icon presses)
        ["txt2img", "img2img"].forEach(function (name) {
            var button = byId(name + "_lora_extra_refresh_internal");
            if (button) {
                button.dispatchEvent(new Event("click"));
            }
        });
    }

    var restoreTries = 0;

    function restoreOnce() {
        // Pressed until the handler has answered: right after onUiLoaded, Gradio may not listen to clicks yet.
        if (textOf("lora_trainer_restored") || restoreTries >= 60) {
            return;
        }
        var button = byId("lora_trainer_restore");
        if (button && restoreTries % 3 === 0) {
            button.click();
        }
        restoreTries += 1;
    }

    function tick() {
        restoreOnce();
        var line = trainingLine();
        showNotice(line);
        if (wasTraining && !line && /^finished/.test(textOf("lora_trainer_run_msg"))) {
            refreshLoraCards(); // the new LoRA shows as a card without a manual refresh
        }
        wasTraining = !!line;
        var now = Date.now();
        var every = line ? POLL_RUNNING_MS : POLL_IDLE_MS;
        if (document.visibilityState === "visible" && now - lastPoll >= every) {
            lastPoll = now;
            var poll = byId("lora_trainer_poll");
            if (poll) {
                poll.click();
            }
        }
    }

    function guardInterrupt(id) {
        var button = byId(id);
        if (!button) {
            return;
        }
        button.addEventListener("click", function (event) {
            if (!trainingLine()) {
                return;  // no training: the WebUI's own Interrupt, untouched
            }
            // The WebUI cannot drop a generation that waits in its queue: it runs when training ends. Its own
            // handler would only show "Interrupting..." for a generation that has not begun, so it is not called.
            event.stopImmediatePropagation();
            event.preventDefault();
            if (confirm("A LoRA is training, and this generation waits for it.\n\nOK: stop " +
                        "the training (a resumable checkpoint is saved) and generate now.\n" +
                        "Cancel: training goes on; the generation runs when it has ended.")) {
                var stop = byId("lora_trainer_stop");
                if (stop) {
                    stop.click();
                }
            }
        }, true);
    }

    onUiLoaded(function () {
        ["txt2img_interrupt", "img2img_interrupt"].forEach(guardInterrupt);
        setInterval(tick, 1000);
    });
})();
