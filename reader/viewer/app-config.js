/** The reading station's configuration of OHIF's viewer (served as /app-config.js).
 *
 * One DICOMweb source: the station's /dicomweb, which passes every request through to the hub's
 * DICOMweb as the signed-in reader (same origin, the session cookie; the hub decides what may be
 * seen). No study list (the station's worklist is the list), no local files, no URL-driven data
 * sources or configuration, no service worker. */
window.config = {
  name: 'teleread station',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // no first-run tour over the reader's images
  customizationService: [
    {
      'ohif.tours': { $set: [] },
      // the radiologist's presets, in the viewport's W/L menu
      'cornerstone.windowLevelPresets': {
        $set: {
          CT: [
            { id: 'ct-lung', description: 'Lung', window: '1500', level: '-600' },
            { id: 'ct-mediastinum', description: 'Mediastinum', window: '350', level: '50' },
            { id: 'ct-bone', description: 'Bone', window: '2000', level: '500' },
            { id: 'ct-brain', description: 'Brain', window: '80', level: '40' },
            { id: 'ct-soft-tissue', description: 'Soft tissue', window: '400', level: '40' },
            { id: 'ct-liver', description: 'Liver', window: '150', level: '90' },
          ],
        },
      },
    },
  ],
  showStudyList: false,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  allowMultiSelectExport: false,
  maxNumRequests: { interaction: 100, thumbnail: 6, prefetch: 12 },
  showErrorDetails: 'production',
  defaultDataSourceName: 'teleread',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'teleread',
      configuration: {
        friendlyName: 'teleread hub',
        name: 'teleread',
        wadoUriRoot: '/dicomweb',
        qidoRoot: '/dicomweb',
        wadoRoot: '/dicomweb',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
