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
  customizationService: [{ 'ohif.tours': { $set: [] } }],
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
