// lora-trainer: on every page load, show the current or last training run and its settings in the Train LoRA
// tab (a reload must never look like "no run"). The WebUI injects every javascript/*.js; onUiLoaded and
// gradioApp come from its script.js. The tab's restore handler then keeps polling while the run goes.
onUiLoaded(function () {
    var button = gradioApp().getElementById("lora_trainer_restore");
    if (button) {
        button.click();
    }
});
