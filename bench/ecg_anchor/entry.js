// The bundle's entry: what the anchor page uses of @cornerstonejs/core.
import { init, RenderingEngine, Enums, metaData } from '@cornerstonejs/core';
window.cs3d = { init, RenderingEngine, Enums, metaData };
