// The anchor page: Cornerstone3D's ECG viewport (bundled from node_modules by bench/station_ecg.py)
// drawing the channels of pydicom's waveform_ecg.dcm (ecg.json, written by the benchmark), timed
// from setEcg to the frame after it was painted, `loads` times.
import "./cs3d-bundle.js";
const { init, RenderingEngine, Enums, metaData } = window.cs3d;
window.__anchor = { error: null, ms: [] };
(async () => {
  try {
    const ecg = await (await fetch("ecg.json")).json();
    const arrays = ecg.data.map((d) => Int16Array.from(d));
    metaData.addProvider((type, id) => {
      if (!id || !id.startsWith("ecg:")) return undefined;
      if (type === "ecgModule") return {
        numberOfWaveformChannels: arrays.length, numberOfWaveformSamples: ecg.n, samplingFrequency: ecg.fs,
        waveformBitsAllocated: 16, waveformSampleInterpretation: "SS", multiplexGroupLabel: ecg.label,
        channelDefinitionSequence: ecg.names.map((n) => ({ channelSourceSequence: { codeMeaning: n } })),
        waveformData: { retrieveBulkData: async () => arrays },
      };
      return undefined;
    }, 10000);
    await init();
    const engine = new RenderingEngine("re");
    engine.enableElement({ viewportId: "ecg", type: Enums.ViewportType.ECG, element: document.getElementById("ecg") });
    const vp = engine.getViewport("ecg");
    const loads = Number(new URLSearchParams(location.search).get("loads") || 20);
    for (let i = 0; i < loads; i += 1) {
      const t0 = performance.now();
      await vp.setEcg(`ecg:${i}`);
      await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
      window.__anchor.ms.push(performance.now() - t0);
    }
    window.__anchor.done = true;
  } catch (e) { window.__anchor.error = String(e && e.stack || e); }
})();
